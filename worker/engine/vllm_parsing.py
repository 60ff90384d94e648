"""vLLM's parser layer for one model: tool calls and reasoning are read back as `vllm serve` does.

The worker does not parse model output itself. For a request offering tools it builds vLLM's own
`ChatCompletionRequest`, lets the model's parser (`ParserManager`: the `--tool-call-parser` and
`--reasoning-parser` names, composed) adjust it (structural tags or a JSON schema for `required` and
named choices, so even a small model emits a well-formed call), and after generation lets the same
parser split the output into reasoning, content and calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from worker.engine.base import Parsed, RawCall
from worker.errors import BadRequestError, ConfigError
from worker.protocol.tools import ToolSet

log = structlog.get_logger(__name__)
STRICT_LEVEL = "parameter"
"""`vllm serve --tool-strict-level parameter`: a call's envelope and its arguments follow the tool's schema
(by default vLLM constrains only the envelope unless a tool says `strict`): a small model then writes
arguments that validate, not merely JSON."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's parser state: vLLM's adjusted request and its parser instance."""

    request: Any
    parser: Any

    @property
    def structured_outputs(self) -> Any:  # noqa: ANN401 - vllm's StructuredOutputsParams
        """What the parser asks the sampler to enforce (None: free text)."""
        return self.request.structured_outputs

    @property
    def skip_special_tokens(self) -> bool:
        """False where call markers are special tokens the parser must see."""
        return bool(self.request.skip_special_tokens)


class OutputParsing:
    """The model's tool and reasoning parsers (by their vLLM names), bound to its tokenizer."""

    def __init__(self, tokenizer: Any, tool_parser: str | None, reasoning_parser: str | None) -> None:  # noqa: ANN401
        from vllm.parser.parser_manager import ParserManager  # noqa: PLC0415

        self._cls: Any = None
        try:
            self._cls = ParserManager.get_parser(
                tool_parser_name=tool_parser,
                reasoning_parser_name=reasoning_parser,
                enable_auto_tools=tool_parser is not None,
                tool_strict_level=STRICT_LEVEL,
                tokenizer=tokenizer,
            )
        except (TypeError, KeyError, ValueError) as exc:
            names = f"model.tool_call_parser {tool_parser!r}, model.reasoning_parser {reasoning_parser!r}"
            raise ConfigError(f"{names}: {exc}") from exc
        self._tokenizer = tokenizer
        self.tools = tool_parser is not None
        self.reasoning = reasoning_parser is not None
        self.name = f"{tool_parser}/{reasoning_parser}"

    def prepare(self, tools: ToolSet | None) -> Prepared:
        """The request as vLLM sees it, adjusted by the parser (structured outputs for forced calls)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: PLC0415

        offered: dict[str, Any] = {}
        if tools is not None and tools.active:
            choice = {"type": "function", "function": {"name": tools.named}} if tools.named else tools.choice
            offered = {"tools": [spec.openai() for spec in tools.specs], "tool_choice": choice}
        try:
            request: Any = ChatCompletionRequest(
                messages=[{"role": "user", "content": ""}], model="vllm-worker", **offered
            )
            parser = self._cls(self._tokenizer, request.tools)
            request = parser.adjust_request(request)
        except ValueError as exc:  # pydantic's ValidationError too: tools vLLM refuses
            raise BadRequestError(f"the tools were refused: {str(exc)[:200]}") from exc
        return Prepared(request, parser)

    def parse(self, prepared: Prepared, text: str) -> Parsed:
        """Split a whole output into reasoning, content and calls; output the parser cannot read is content."""
        try:
            reasoning, content, calls = prepared.parser.parse(text, prepared.request, enable_auto_tools=self.tools)
        except Exception:  # noqa: BLE001 - the model's output is untrusted: a parser failure means "no call"
            log.warning("engine.output_parse_failed", parser=self.name, chars=len(text))
            return Parsed(text)
        found = tuple(RawCall(str(c.name), str(c.arguments)) for c in calls or ())
        return Parsed(content or "", found, str(reasoning) if reasoning is not None else None)
