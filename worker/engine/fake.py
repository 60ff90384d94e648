"""A deterministic in-memory engine for unit/integration tests and MQTT micro-benchmarks.

It tokenizes on whitespace, renders a ChatML-like template and "generates" the words of a scripted
answer, one word per `token_delay_s`. Concurrent requests sleep concurrently, like a batching engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import structlog

from worker.engine.adapters import Adapter
from worker.engine.base import Delta, EngineStats, Parsed, Prompt, RawCall
from worker.errors import BadRequestError, EngineDeadError, EngineError
from worker.protocol.messages import ChatMessage, Sampling
from worker.protocol.tools import ToolSet

Script = Callable[[Prompt], str]
log = structlog.get_logger(__name__)


def echo_script(prompt: Prompt) -> str:
    """Answer with how many user turns the prompt holds and the last user message."""
    users = [m.content for m in prompt.messages if m.role == "user"]
    return f"echo {len(users)}: {users[-1] if users else ''}"


HISTORY_SEPARATOR = " | "


def history_script(prompt: Prompt) -> str:
    """Answer with every user message the prompt holds, oldest first: what the engine saw of the session.

    The chaos run's checker compares it with the turns each client was told succeeded.
    """
    return "history: " + HISTORY_SEPARATOR.join(m.content for m in prompt.messages if m.role == "user")


SCRIPTS: dict[str, Script] = {"echo": echo_script, "history": history_script}


def schema_example(schema_json: str) -> str:
    """A minimal JSON instance of an object schema (what a constrained decoder could produce)."""
    schema = json.loads(schema_json)
    defaults = {
        "string": "",
        "number": 0,
        "integer": 0,
        "boolean": False,
        "array": [],
        "object": {},
        "null": None,
    }
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    instance = {name: defaults.get(str(spec.get("type"))) for name, spec in props.items() if isinstance(spec, dict)}
    return json.dumps(instance)


def tool_calls(prompt: Prompt, tools: ToolSet) -> tuple[RawCall, ...]:
    """The calls the fake makes, scripted by the last user message: each word `call:NAME` or `call:NAME:JSON`.

    A chat whose last message is a tool result makes no call (the fake answers with the results), unless
    the choice forces one or the user said `loop:NAME` (called again after every result). `required`
    without a scripted call calls the first tool; a named choice calls that tool (with the scripted
    arguments, if any). Arguments default to a minimal instance of the schema.
    """
    last = prompt.messages[-1] if prompt.messages else None
    users = [m for m in prompt.messages if m.role == "user"]
    scripted: list[RawCall] = []
    if last is not None and (last.role == "user" or (last.role == "tool" and users)):
        markers = ("call:", "loop:") if last.role == "user" else ("loop:",)
        for word in users[-1].content.split():
            if word.startswith(markers):
                name, _, arguments = word[len("call:") :].partition(":")
                spec = tools.spec(name)
                default = schema_example(spec.parameters) if spec is not None and spec.parameters else "{}"
                scripted.append(RawCall(name, arguments or default))
    if tools.named is not None:
        spec = tools.spec(tools.named)
        scripted = [c for c in scripted if c.name == tools.named][:1]
        return tuple(scripted) or (
            RawCall(tools.named, schema_example(spec.parameters) if spec and spec.parameters else "{}"),
        )
    if tools.choice == "required" and not scripted:
        first = tools.specs[0]
        return (RawCall(first.name, schema_example(first.parameters) if first.parameters else "{}"),)
    return tuple(scripted)


def tool_answer(prompt: Prompt) -> str | None:
    """After tool results, the fake answers with them: `results: <content> | <content>`."""
    results: list[str] = []
    for message in reversed(prompt.messages):
        if message.role != "tool":
            break
        results.insert(0, message.content)
    return "results: " + " | ".join(results) if results else None


class FakeEngine:
    """Engine double honouring the `Engine` protocol; see the module docstring."""

    def __init__(
        self,
        script: Script = echo_script,
        token_delay_s: float = 0.0,
        fail_after: int | None = None,
        max_model_len: int = 2048,
        model_name: str = "fake-model",
        *,
        log_generations: bool = False,
        start_s: float = 0.0,
        reasoning_parser: bool = False,
        prefix_cache: bool = False,
    ) -> None:
        self._script = script
        self._start_s = start_s
        """How long entering takes (a real engine loads for 10 s to minutes: start-up races are tested with it)."""
        self._log_generations = log_generations
        self._reasoning_parser = reasoning_parser
        self._prefixes: dict[int, None] | None = {} if prefix_cache else None
        """Hashes of prompt prefixes seen (blocks of PREFIX_BLOCK words), like vLLM's prefix cache: a prompt
        whose prefix this engine saw reports those tokens as cached. Bounded (PREFIX_CACHE entries)."""
        """Split `<think>...</think>` off the whole output into `Delta.parsed`, as a reasoning parser does."""
        self._token_delay_s = token_delay_s
        self._fail_after = fail_after
        self._max_model_len = max_model_len
        self._model_name = model_name
        self.running = 0
        self.max_running_seen = 0
        self.aborted: list[str] = []
        """Request ids whose consumer cancelled them (the latest KEEP_HISTORY)."""
        self.priorities: list[int] = []
        """Priorities requests arrived with (the latest KEEP_HISTORY)."""
        self.adapters: dict[int, Adapter] = {}
        """Loaded adapters by id; a request's answer starts `[<adapter name>] ` when it runs with one."""
        self.dead = False

    @property
    def model_name(self) -> str:
        """Name reported on the wire."""
        return self._model_name

    @property
    def max_model_len(self) -> int:
        """Context window in (whitespace) tokens."""
        return self._max_model_len

    @property
    def quantization(self) -> str:
        """The fake is never quantized."""
        return "none"

    @property
    def dtype(self) -> str:
        """The fake computes nothing."""
        return "none"

    @property
    def dtype_reason(self) -> str:
        """Why "none"."""
        return "the fake engine computes nothing"

    async def __aenter__(self) -> Self:
        await asyncio.sleep(self._start_s)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def render(self, messages: Sequence[ChatMessage], tools: ToolSet | None = None) -> Prompt:
        """ChatML-like text; one token per whitespace-separated word plus two per turn (and per tool offered)."""
        offered = "".join(f"<|tool|>{t.name}\n" for t in tools.specs) if tools is not None else ""
        text = offered + "".join(f"<|{m.role}|>{m.content}{_calls_text(m)}\n" for m in messages) + "<|assistant|>"
        count = sum(len(m.content.split()) + 2 + 2 * len(m.tool_calls) for m in messages) + 1
        return Prompt(tuple(messages), text, tuple(range(count + 2 * len(offered.splitlines()))))

    async def count_tokens(self, *texts: str) -> int:
        """Whitespace tokens."""
        return sum(len(text.split()) for text in texts)

    async def load_adapter(self, adapter: Adapter) -> None:
        """Remember it (a request naming an adapter that is not loaded fails, as in vLLM)."""
        self.adapters[adapter.id] = adapter

    async def unload_adapter(self, adapter: Adapter) -> None:
        """Forget it."""
        self.adapters.pop(adapter.id, None)

    async def generate(
        self,
        prompt: Prompt,
        sampling: Sampling,
        request_id: str,
        priority: int = 0,
        adapter: Adapter | None = None,
        *,
        tools: ToolSet | None = None,
    ) -> AsyncIterator[Delta]:
        """Yield the scripted answer word by word (a schema-shaped JSON object when a schema is given).

        Like vLLM: a prompt that leaves no room in the context is a `BadRequestError`; the answer ends
        before the first stop string (finish "stop"), or after `max_tokens` words (finish "length").
        """
        if len(prompt.token_ids) >= self._max_model_len:
            raise BadRequestError(f"prompt of {len(prompt.token_ids)} tokens leaves no room in {self._max_model_len}")
        _remember(self.priorities, priority)
        if self._log_generations:  # one line per generation: the chaos checker counts them per requestId
            log.info("fake.generated", request_id=request_id)
        calls, words = self._words(prompt, sampling, tools, adapter)
        cached = self._cached(prompt)
        limit = min(len(words), sampling.max_tokens)
        self.running += 1
        self.max_running_seen = max(self.max_running_seen, self.running)
        try:
            for i, word in enumerate(words[:limit]):
                if self.dead:
                    raise EngineDeadError("fake engine marked dead")
                if self._fail_after is not None and i >= self._fail_after:
                    raise EngineError("fake engine failure")
                if self._token_delay_s:
                    await asyncio.sleep(self._token_delay_s)
                last = i == limit - 1
                reason = ("stop" if limit == len(words) else "length") if last else None
                parsed = None
                if last and (tools is not None or self._reasoning_parser):
                    parsed = self._parsed(" ".join(words[:limit]), calls if reason == "stop" else ())
                yield Delta(
                    text=word if i == 0 else " " + word,
                    new_tokens=1,
                    finish_reason=reason,
                    prompt_tokens=len(prompt.token_ids),
                    cached_tokens=cached,
                    parsed=parsed,
                )
        except asyncio.CancelledError:
            _remember(self.aborted, request_id)
            raise
        finally:
            self.running -= 1

    def _cached(self, prompt: Prompt) -> int:
        """Tokens of this prompt's prefix seen before (whole blocks); remembers its prefixes."""
        if self._prefixes is None:
            return 0
        words, cached, hit = prompt.text.split(), 0, True
        for end in range(PREFIX_BLOCK, len(words) + 1, PREFIX_BLOCK):
            key = hash(tuple(words[:end]))
            if hit and key in self._prefixes:
                cached = end
            else:
                hit = False
            self._prefixes[key] = None
        while len(self._prefixes) > PREFIX_CACHE:
            del self._prefixes[next(iter(self._prefixes))]
        return min(cached, len(prompt.token_ids))

    def _parsed(self, text: str, calls: tuple[RawCall, ...]) -> Parsed:
        reasoning = None
        if self._reasoning_parser and "<think>" in text and "</think>" in text:
            head, _, rest = text.partition("<think>")
            reasoning, _, tail = rest.partition("</think>")
            text = head + tail
        return Parsed("" if calls else text, calls, reasoning)

    def _words(
        self, prompt: Prompt, sampling: Sampling, tools: ToolSet | None, adapter: Adapter | None
    ) -> tuple[tuple[RawCall, ...], list[str]]:
        """The calls to make (written Hermes-style) or the scripted answer, cut at a stop string, as words."""
        calls = tool_calls(prompt, tools) if tools is not None and tools.active else ()
        if calls:
            answer = " ".join(_hermes(c) for c in calls)
        elif tools is not None and (after_tools := tool_answer(prompt)) is not None:
            answer = after_tools
        else:
            answer = schema_example(sampling.json_schema) if sampling.json_schema else self._script(prompt)
        if adapter is not None:
            if adapter.id not in self.adapters:
                raise EngineError(f"adapter {adapter.name} is not loaded")
            answer = f"[{adapter.name}] {answer}"
        cuts = [i for stop in sampling.stop if (i := answer.find(stop)) >= 0]
        answer = answer[: min(cuts)] if cuts else answer
        return calls, answer.split(" ")

    async def check_health(self) -> None:
        """Dead once `dead` is set (tests simulate an engine crash with it)."""
        if self.dead:
            raise EngineDeadError("fake engine marked dead")

    def stats(self) -> EngineStats:
        """Running count only: the fake has no KV cache."""
        return EngineStats(running=self.running)

    def inflight(self) -> int:
        """Requests generating right now (a cancelled consumer is counted out at once)."""
        return self.running


def _hermes(call: RawCall) -> str:
    """A call as a Hermes-style model writes it (one word: the fake streams whitespace-separated words)."""
    return f'<tool_call>{{"name":"{call.name}","arguments":{call.arguments}}}</tool_call>'.replace(" ", "")


def _calls_text(message: ChatMessage) -> str:
    return "".join(_hermes(RawCall(c.name, c.arguments)) for c in message.tool_calls)


PREFIX_BLOCK = 16
PREFIX_CACHE = 65536
KEEP_HISTORY = 256
"""What tests inspect is the recent past; a soak of millions of requests must not grow it (it did: 8 B each)."""


def _remember(history: list[Any], item: object) -> None:
    history.append(item)
    if len(history) > 2 * KEEP_HISTORY:
        del history[:-KEEP_HISTORY]
