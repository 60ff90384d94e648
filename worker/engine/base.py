"""The engine contract the service talks to; it knows nothing of MQTT.

It takes the protocol's chat types (`ChatMessage`, `Sampling`) as input; the protocol never imports it.

Two implementations honour it: `VllmEngine` (the real in-process AsyncLLM) and `FakeEngine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from worker.engine.adapters import Adapter
from worker.protocol.messages import ChatMessage, Sampling
from worker.protocol.tools import ToolSet


@dataclass(frozen=True, slots=True)
class Prompt:
    """A chat rendered with the model's template, plus its token ids (their count is what limits use)."""

    messages: tuple[ChatMessage, ...]
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RawCall:
    """A tool call as the engine's parser read it from the output: `arguments` as the model wrote them."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Parsed:
    """A whole output split by the model's parsers: the text for the user, the tool calls made."""

    content: str
    calls: tuple[RawCall, ...] = ()
    reasoning: str | None = None
    """What the model's reasoning parser split off (None: no parser, or no reasoning)."""


@dataclass(frozen=True, slots=True)
class Delta:
    """New text since the previous delta; the last one of a request carries `finish_reason`.

    With tools or a reasoning parser, the last one also carries `parsed`: the whole output split into
    reasoning, content and calls.
    """

    text: str
    new_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    parsed: Parsed | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of engine-side load and speed for telemetry."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prompt_tok_per_s: float = 0.0
    gen_tok_per_s: float = 0.0
    ttft_ms_p50: float = 0.0
    tpot_ms_p50: float = 0.0
    preemptions: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """What the service needs from a model engine."""

    @property
    def model_name(self) -> str:
        """Name reported on the wire."""
        ...

    @property
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + answer)."""
        ...

    @property
    def quantization(self) -> str:
        """The quantization method in effect ("none" when unquantized)."""
        ...

    @property
    def dtype(self) -> str:
        """The dtype the engine runs (`auto` resolved where the worker decides it)."""
        ...

    @property
    def dtype_reason(self) -> str:
        """Why that dtype (start-up lines and status say it)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def render(self, messages: Sequence[ChatMessage], tools: ToolSet | None = None) -> Prompt:
        """Apply the chat template (with the generation prompt and the tools offered) and tokenize."""
        ...

    async def count_tokens(self, *texts: str) -> int:
        """Tokens in the texts together, without any template (one call: one hop to the tokenizer)."""
        ...

    def generate(
        self,
        prompt: Prompt,
        sampling: Sampling,
        request_id: str,
        priority: int = 0,
        adapter: Adapter | None = None,
        *,
        tools: ToolSet | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream deltas; cancelling the consumer aborts the request and frees its KV cache.

        `priority` (lower first) matters only when the engine schedules by priority; `adapter` runs the
        request with that LoRA (batched with requests of other adapters and of none). With active `tools`
        the engine constrains the output as `tools.choice` demands and parses the calls (`Delta.parsed`).
        """
        ...

    async def load_adapter(self, adapter: Adapter) -> None:
        """Load a LoRA adapter (checked already) so requests can use it; raises `EngineError` if it fails."""
        ...

    async def unload_adapter(self, adapter: Adapter) -> None:
        """Drop an adapter no request uses any more."""
        ...

    def stats(self) -> EngineStats:
        """Latest engine statistics."""
        ...

    def inflight(self) -> int:
        """Requests the engine holds right now (running or waiting); an aborted one no longer counts."""
        ...

    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine is gone (its process died)."""
        ...
