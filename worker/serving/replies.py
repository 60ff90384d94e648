"""`Replier`: turns a request's progress into wire messages (classic text or v2 JSON) and publishes them.

v2 streams are coalesced: the first chunk goes out at once (it is the time to first token), later ones
when `stream_max_tokens` tokens have accumulated or `stream_interval_ms` passed since the previous one,
so a fast model does not flood the broker. `seq` rises by one per message of a request; the final
message carries the whole text, usage and timing. What a stream shows is computed incrementally
(`VisibleText`), so a long answer costs linear, not quadratic, time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from worker.errors import BadRequestError, ErrorCode, PublishError, WorkerError
from worker.protocol import (
    Dialect,
    FinalReply,
    Request,
    Route,
    classic_answer,
    classic_error,
    v2_error,
    v2_message,
)
from worker.protocol.encode import ReasoningFilter
from worker.protocol.tools import ToolCall
from worker.serving.accounting import Spent

log = structlog.get_logger(__name__)


class Publish(Protocol):
    """Publish one reply message; `wait` = until the broker acked it."""

    def __call__(self, topic: str, payload: bytes, correlation: bytes | None, *, wait: bool) -> Awaitable[None]:
        """See the class docstring."""
        ...


BeforeFinal = Callable[[FinalReply, ErrorCode | None], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished generation."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: int
    ttft_ms: int
    total_ms: int
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the answer made (finish reason `tool_calls`); an unrunnable one carries its `error`."""
    trace: tuple[dict[str, Any], ...] = ()
    """Device-tool rounds: each round's calls, results, timings and usage."""
    reasoning: str | None = None
    """The model's reasoning, split off by its reasoning parser, for a v2 project that keeps it."""


class VisibleText:
    """What a client may see of a growing raw answer, fed piece by piece, each piece looked at once.

    Matches `protocol.visible_text` on the final text: `<think>...</think>` blocks dropped (when the
    project strips reasoning; an unclosed block hides the rest), outer whitespace trimmed (trailing
    whitespace is held back until text follows it). A `</think>` with no opening tag means everything so
    far was reasoning whose tag sat in the template: the stream then stops showing text and the final
    message's whole `text` is authoritative.
    """

    def __init__(self, strip_reasoning: bool) -> None:
        self._reasoning = ReasoningFilter() if strip_reasoning else None
        self._started = False
        self._held_space = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add raw text; returns the newly visible text (possibly empty)."""
        if self.stopped:
            return ""
        if self._reasoning is not None:
            text, voided = self._reasoning.feed(text)
            if voided:  # what was already sent cannot be taken back: stop, the final text decides
                self.stopped = True
                return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held_space + text
        shown = text.rstrip()
        self._held_space = text[len(shown) :]
        return shown


class Stream:
    """One request's outgoing messages: coalesced v2 chunks (when asked for) and the final reply.

    Chunks carry the visible text (reasoning stripped as the project says), so the deltas of a stream,
    the final message's included, add up to its final `text`.
    """

    def __init__(self, replier: Replier, request: Request) -> None:
        self._replier = replier
        self._request = request
        self.route = request.route
        self._seq = 0
        self._raw: list[str] = []
        self._visible = VisibleText(request.project.strip_reasoning) if request.stream else None
        self._sent: list[str] = []
        self._unsent = ""
        self._pending_tokens = 0
        self._last_flush = time.monotonic()
        self.spent = Spent()
        """What the request cost so far, and how it ended (`accounting`)."""
        self.before_final: BeforeFinal | None = None
        """Awaited with the final reply (and its error code, if any) just before it is published: `serve`
        caches it for the requestId first, so a copy arriving right after the reply finds it cached. False:
        another worker holds or answered the requestId since, and this final reply must not go out."""

    @property
    def raw_text(self) -> str:
        """Everything the engine produced so far (joined on demand: call it once, at the end)."""
        return "".join(self._raw)

    async def feed(self, text: str, tokens: int) -> None:
        """New text from the engine; publishes a chunk when the coalescing window is full."""
        self._raw.append(text)
        if self._visible is None:
            return
        self._unsent += self._visible.feed(text)
        self._pending_tokens += tokens
        now = time.monotonic()
        first = self._seq == 0  # the first token goes out at once: time-to-first-token is what users feel
        full = self._pending_tokens >= self._replier.max_tokens
        if self._unsent and (first or full or now - self._last_flush >= self._replier.interval_ms / 1000):
            await self._flush(now)

    async def _flush(self, now: float) -> None:
        delta, self._unsent = self._unsent, ""
        self._seq += 1
        self._sent.append(delta)
        self._pending_tokens, self._last_flush = 0, now
        await self._chunk(v2_message(self.route, self._seq, done=False, delta=delta))

    async def _chunk(self, payload: bytes) -> None:
        """Chunks do not wait for PUBACK (ordering holds per topic); only the final reply does."""
        route = self.route
        try:
            await self._replier.publish(route.topic, payload, route.correlation_data, wait=False)
        except PublishError as exc:  # the final error then goes to the sender's own topic (`send_final`)
            raise BadRequestError(UNPUBLISHABLE) from exc

    async def event(self, fields: dict[str, Any]) -> None:
        """One step shown to a streaming client (a tool call or result); nothing for other requests."""
        if self._visible is not None:
            self._seq += 1
            await self._chunk(v2_message(self.route, self._seq, done=False, **fields))

    def _final_delta(self, text: str) -> str | None:
        """The final text no chunk carried yet ("" when the stream diverged from it); None when not streaming."""
        if self._visible is None:
            return None
        sent = "".join(self._sent)
        return text[len(sent) :] if text.startswith(sent) else ""

    async def finish(self, outcome: Outcome) -> FinalReply | None:
        """Send the final answer; for a stream, its `delta` is the text no chunk carried yet.

        None when it did not go out: another worker answers the requestId (see `before_final`).
        """
        route = self.route
        if self._visible is not None:
            for call in outcome.tool_calls:  # a stream shows each call as an event before the final reply
                await self.event({"event": "toolCall", "toolCall": call.wire()})
        self._seq += 1
        if route.dialect is Dialect.CLASSIC:
            payload = classic_answer(outcome.text)
        else:
            payload = v2_message(
                route,
                self._seq,
                done=True,
                text=outcome.text,
                delta=self._final_delta(outcome.text),
                finishReason=outcome.finish_reason,
                reasoning=outcome.reasoning,
                toolCalls=[call.wire() for call in outcome.tool_calls] or None,
                trace=list(outcome.trace) or None,
                usage={
                    "promptTokens": outcome.prompt_tokens,
                    "completionTokens": outcome.completion_tokens,
                    "cachedTokens": outcome.cached_tokens,
                },
                timing={"queueMs": outcome.queue_ms, "ttftMs": outcome.ttft_ms, "totalMs": outcome.total_ms},
                model=self._replier.model,
                worker=self._replier.worker,
                affinity=self._replier.affinity(route),
            )
        return await self._send_final(payload, None)

    async def fail(self, error: WorkerError) -> FinalReply | None:
        """Send the final error (continuing this request's seq); None as for `finish`."""
        self._seq += 1
        return await self._send_final(self._replier.error_payload(self.route, error, self._seq), error.code)

    async def _send_final(self, payload: bytes, code: ErrorCode | None) -> FinalReply | None:
        route = self.route
        final = FinalReply(route.topic, payload, route.correlation_data)
        if self.before_final is not None and not await self.before_final(final, code):
            return None
        return await self._replier.send_final(route, payload, self._seq)


UNPUBLISHABLE = "the reply topic cannot be published to"


class Replier:
    """Publishes exactly one final message per request, plus coalesced chunks for v2 streams."""

    def __init__(
        self,
        publish: Publish,
        model: str,
        worker: str,
        interval_ms: int = 50,
        max_tokens: int = 16,
        *,
        affinity: Callable[[Route], dict[str, str] | None] | None = None,
    ) -> None:
        self.publish = publish
        self.model = model
        self.worker = worker
        self.interval_ms = interval_ms
        self.max_tokens = max_tokens
        self.affinity = affinity or (lambda _route: None)
        """What a final v2 answer says about stickiness: where the session's next turn may go (None: anywhere)."""

    def stream(self, request: Request) -> Stream:
        """The message sequence of one request."""
        return Stream(self, request)

    async def send_final(self, route: Route, payload: bytes, seq: int = 1) -> FinalReply:
        """Publish a final message and wait for the broker's ack.

        When the topic the client chose cannot be published to, the final reply becomes a `bad_request`
        on the sender's own topic (from its validated ids); with no such topic `PublishError` propagates
        and the message is acked unanswered (the job table counts it).
        """
        try:
            await self.publish(route.topic, payload, route.correlation_data, wait=True)
        except PublishError as exc:
            if route.own_topic is None:
                raise
            log.warning("reply.unpublishable", project=route.project, request_id=route.request_id, reason=str(exc))
            own = dataclasses.replace(route, topic=route.own_topic, own_topic=None)
            return await self.send_final(own, self.error_payload(own, BadRequestError(UNPUBLISHABLE), seq))
        return FinalReply(route.topic, payload, route.correlation_data)

    async def fail(self, route: Route, error: WorkerError, seq: int = 1) -> FinalReply:
        """Send a final error."""
        return await self.send_final(route, self.error_payload(route, error, seq), seq)

    def error_payload(self, route: Route, error: WorkerError, seq: int = 1) -> bytes:
        """The final error message in the route's dialect."""
        if route.dialect is Dialect.CLASSIC:
            return classic_error(error)
        return v2_error(route, seq, error, self.model, self.worker)
