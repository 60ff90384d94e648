"""An asyncio client for apps that talk to a vllm-worker fleet (v2 dialect: JSON replies, correlation).

async with Client(BrokerConfig(url="mqtt://127.0.0.1:1883")) as client:
    reply = await client.ask("maze", "Which way is out?", session="s1")
    print(reply.text)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from worker.bus import Bus
from worker.config import BrokerConfig
from worker.protocol import Topics


@dataclass(frozen=True, slots=True)
class Reply:
    """A final v2 reply."""

    request_id: str
    text: str
    finish_reason: str
    error_code: str | None = None
    error_message: str | None = None
    retry_after_ms: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True for an answer, False for an error reply."""
        return self.error_code is None


class Client:
    """One MQTT connection; any number of concurrent `ask` calls."""

    def __init__(self, broker: BrokerConfig, client_id: str | None = None, topic_prefix: str = "") -> None:
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self._bus = Bus(broker, self.client_id)
        self._topics = Topics(topic_prefix)
        self._subscribed: set[str] = set()
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._bus.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._bus.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        while True:
            msg = await self._bus.messages()
            self._bus.ack(msg)
            if msg.topic not in self._subscribed:
                continue  # amqtt delivers retained messages of other filters: ignore what we did not ask for
            try:
                body = json.loads(msg.payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(body, dict) or not body.get("done"):
                continue
            fut = self._waiting.pop(str(body.get("requestId")), None)
            if fut is not None and not fut.done():
                fut.set_result(_reply(body))

    async def ask(
        self,
        project: str,
        message: str,
        *,
        session: str = "default",
        timeout_s: float = 120.0,
        request_id: str | None = None,
        **fields: Any,  # noqa: ANN401 - protocol fields (temperature, maxTokens, ...)
    ) -> Reply:
        """Send one request and wait for its final reply (raises TimeoutError after `timeout_s`)."""
        reply_topic = self._topics.v2_reply(project, self.client_id)
        if reply_topic not in self._subscribed:
            self._subscribed.add(reply_topic)
            await self._bus.subscribe([reply_topic])
        request_id = request_id or uuid.uuid4().hex
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        body = {
            "v": 2,
            "message": message,
            "sessionId": session,
            "clientId": self.client_id,
            "requestId": request_id,
        }
        body.update(fields)
        try:
            await self._bus.publish(self._topics.user_input(project), json.dumps(body).encode())
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self._waiting.pop(request_id, None)


def _reply(body: dict[str, Any]) -> Reply:
    error = body.get("error") if isinstance(body.get("error"), dict) else None
    return Reply(
        request_id=str(body.get("requestId")),
        text=str(body.get("text", "")),
        finish_reason=str(body.get("finishReason", "")),
        error_code=error.get("code") if error else None,
        error_message=error.get("message") if error else None,
        retry_after_ms=error.get("retryAfterMs") if error else None,
        raw=body,
    )
