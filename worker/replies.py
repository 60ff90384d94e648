"""`Replier`: turns a request's outcome into wire messages (classic text or v2 JSON) and publishes them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker.errors import WorkerError
from worker.protocol import Dialect, Request, Route, classic_answer, classic_error, v2_error, v2_message

Publish = Callable[[str, bytes, bytes | None], Awaitable[None]]
"""(topic, payload, correlation data) -> published."""


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


class Replier:
    """Publishes exactly one final message per request (stream chunks come with protocol v2)."""

    def __init__(self, publish: Publish, model: str, worker: str) -> None:
        self._publish = publish
        self._model = model
        self._worker = worker

    async def answer(self, request: Request, outcome: Outcome) -> None:
        """Send the final answer."""
        route = request.route
        if route.dialect is Dialect.CLASSIC:
            payload = classic_answer(outcome.text)
        else:
            payload = v2_message(
                route,
                1,
                done=True,
                text=outcome.text,
                finishReason=outcome.finish_reason,
                usage={
                    "promptTokens": outcome.prompt_tokens,
                    "completionTokens": outcome.completion_tokens,
                    "cachedTokens": outcome.cached_tokens,
                },
                timing={"queueMs": outcome.queue_ms, "ttftMs": outcome.ttft_ms, "totalMs": outcome.total_ms},
                model=self._model,
                worker=self._worker,
            )
        await self._publish(route.topic, payload, route.correlation_data)

    async def fail(self, route: Route, error: WorkerError) -> None:
        """Send the final error."""
        if route.dialect is Dialect.CLASSIC:
            payload = classic_error(error)
        else:
            payload = v2_error(route, 1, error, self._model, self._worker)
        await self._publish(route.topic, payload, route.correlation_data)
