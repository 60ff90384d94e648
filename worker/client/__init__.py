"""An asyncio client for apps that talk to a vllm-worker fleet (v2 dialect: JSON replies, correlation).

    async with Client(BrokerConfig(url="mqtt://127.0.0.1:1883")) as client:
        reply = await client.ask("maze", "Which way is out?", session="s1")
        async for chunk in client.stream("maze", "Describe the room", session="s1"):
            print(chunk.delta, end="")            # the last chunk has done=True and the full reply

`ask` retries after `timeout_s` with the same requestId (`retries`), which the worker's dedupe makes
safe: a request is never generated twice, and a redelivered final reply is simply re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from worker.client.workers import STATUS_GRACE_S, Workers
from worker.config import BrokerConfig
from worker.protocol import Topics, is_valid_id
from worker.transport.bus import Bus

EVENT_FIELDS: tuple[str, ...] = ("event", "toolCall", "toolResult")
"""What a stream's step chunk carries (see `Chunk.event`)."""
ToolRunner = Callable[[str, dict[str, Any]], Any]
"""Runs one tool call: `(name, arguments) -> result` (text, or JSON-able), sync or async."""
MAX_STICKY = 4096
"""Sessions whose sticky worker is remembered (the oldest are forgotten: their turns use the shared topic)."""


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

    previous: tuple[Reply, ...] = ()
    """With `on_tool`: the replies of the earlier rounds (each ended in tool calls), oldest first."""

    @property
    def ok(self) -> bool:
        """True for an answer, False for an error reply."""
        return self.error_code is None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls the model made (`finish_reason == "tool_calls"`): `{id, name, arguments[, error]}`."""
        calls = self.raw.get("toolCalls")
        return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed message: its `delta` text; the last one (`done`) also has the final `reply`.

    The deltas of a stream add up to the reply's text.
    """

    seq: int
    delta: str
    done: bool
    reply: Reply | None = None
    event: dict[str, Any] | None = None
    """A step shown while the request runs: `{"event": "toolCall", "toolCall": {...}}` or a `toolResult`."""


class Client:
    """One MQTT connection; any number of concurrent requests."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str | None = None,
        topic_prefix: str = "",
        *,
        persistent: bool = False,
        connection_id: str | None = None,
        affinity: bool = True,
        affinity_timeout_s: float = 3.0,
    ) -> None:
        """`client_id` is the v2 clientId (reply topic, session namespace) and, by default, the MQTT client id.

        `persistent` (with a fixed `client_id`, MQTT 5): replies published while this client is away wait.
        `connection_id`: another MQTT client id, e.g. for several processes of one identity (a broker that
        forces client id = username, as the shipped deploy does, overrides it anyway). `affinity`: send a
        session's next turn to the worker that invited it (its KV cache holds the conversation), back on
        the shared topic when that worker is not ready, answers `overloaded`, or says nothing for
        `affinity_timeout_s` (the same requestId: answered once).
        """
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self._bus = Bus(broker, connection_id or self.client_id, persistent=persistent)
        self._topics = Topics(topic_prefix)
        self._subscribed: set[str] = set()
        self._inboxes: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: Callable[[str, bytes], object] | None = None
        self._workers = Workers(self._bus, topic_prefix)
        self._affinity, self._affinity_timeout_s = affinity, affinity_timeout_s
        self._sticky: dict[tuple[str, str], str] = {}  # (project, session) -> the worker that invited it
        self.fallbacks = 0
        """Sticky turns sent again on the shared topic (worker silent or overloaded)."""

    async def __aenter__(self) -> Self:
        await self._bus.__aenter__()
        # a reader that died shows as TimeoutError in ask/stream (the caller retries or gives up)
        self._reader = asyncio.create_task(self._read())  # supervised: see the line above
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
            if self._workers.is_status(msg.topic):
                self._workers.note(msg.topic, msg.payload)
            if self._watcher is not None and msg.topic not in self._subscribed:
                self._watcher(msg.topic, msg.payload)  # e.g. FleetState.handle: validates, never raises
                continue
            if msg.topic not in self._subscribed:
                continue  # amqtt delivers retained messages of other filters: ignore what we did not ask for
            try:
                body = json.loads(msg.payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(body, dict):
                continue
            # requests are keyed by requestId; a session-reset confirmation has none
            key = str(body["requestId"]) if body.get("requestId") else f"reset:{body.get('sessionId')}"
            if (inbox := self._inboxes.get(key)) is not None:
                inbox.put_nowait(body)

    async def wait_for_worker(
        self, project: str, timeout_s: float, on_wait: Callable[[], object] | None = None
    ) -> None:
        """Return once some worker's retained status says `ready` and lists `project`.

        A request published before any worker subscribed is dropped by the broker (nobody takes it): an app
        that starts with its fleet waits here first. `on_wait` is called once when no worker is ready at
        once (e.g. to print "waiting for a worker..."); raises TimeoutError after `timeout_s`.
        """
        await self._workers.watch()
        async with asyncio.timeout(timeout_s):
            try:
                await self._workers.until(lambda: self._workers.serving(project), STATUS_GRACE_S)
            except TimeoutError:
                if on_wait is not None:
                    on_wait()
                await self._workers.until(lambda: self._workers.serving(project), timeout_s)

    async def watch(self, filters: list[str], handler: Callable[[str, bytes], object]) -> None:
        """Also subscribe `filters` and hand their messages to `handler` (one connection for a console)."""
        self._watcher = handler
        await self._bus.subscribe(filters)

    async def _ensure_subscribed(self, project: str) -> str:
        topic = self._topics.v2_reply(project, self.client_id)
        if topic not in self._subscribed:
            self._subscribed.add(topic)
            await self._bus.subscribe([topic])
        return topic

    def _body(self, message: str | None, session: str, request_id: str, fields: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {"v": 2, "sessionId": session, "clientId": self.client_id, "requestId": request_id}
        if message is not None and "messages" not in fields:  # a stateless full chat replaces the message
            body["message"] = message
        body.update(fields)
        return json.dumps(body).encode()

    @contextlib.asynccontextmanager
    async def _inbox(self, project: str, key: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Messages for `key` (a requestId, or reset:<session>) on this client's reply topic, while open."""
        await self._ensure_subscribed(project)
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inboxes[key] = inbox
        try:
            yield inbox
        finally:
            self._inboxes.pop(key, None)

    async def stream(
        self,
        project: str,
        message: str,
        *,
        session: str = "default",
        timeout_s: float = 120.0,
        request_id: str | None = None,
        **fields: Any,  # noqa: ANN401 - protocol fields (temperature, maxTokens, ...)
    ) -> AsyncIterator[Chunk]:
        """Send a streaming request; yields chunks in `seq` order, the last one `done` with the reply.

        `timeout_s` bounds the wait for each next message. A session its last answer invited to a worker
        goes there first, as with `ask` (the worker's `accepted` acknowledgement is not yielded).
        """
        request_id = request_id or uuid.uuid4().hex
        async with self._inbox(project, request_id) as inbox:
            payload = self._body(message, session, request_id, {**fields, "stream": True})
            shared = self._topics.user_input(project)
            direct = self._direct(project, session)
            await self._bus.publish(direct or shared, payload)
            first = True
            while True:
                async with asyncio.timeout(timeout_s):
                    body = await (self._next(inbox, payload, shared if direct else None) if first else inbox.get())
                first = False
                if body.get("event") == "accepted" and not body.get("done"):
                    continue  # the sticky worker took it: its chunks follow
                done = bool(body.get("done"))
                event: dict[str, Any] | None = {k: body[k] for k in EVENT_FIELDS if k in body} or None
                seq, delta = int(body.get("seq", 0)), str(body.get("delta", ""))
                reply = _reply(body) if done else None
                if reply is not None:
                    await self._remember(project, session, reply)
                yield Chunk(seq, delta, done, reply, event)
                if done:
                    return

    async def ask(
        self,
        project: str,
        message: str,
        *,
        session: str = "default",
        timeout_s: float = 120.0,
        retries: int = 2,
        request_id: str | None = None,
        on_tool: ToolRunner | None = None,
        max_tool_rounds: int = 4,
        **fields: Any,  # noqa: ANN401 - protocol fields (temperature, maxTokens, tools, toolChoice, ...)
    ) -> Reply:
        """Send one request and wait for its final reply; resend (same requestId) up to `retries` times.

        With `tools` (a protocol field) and `on_tool(name, arguments) -> result`, calls the model makes are
        run here and their results sent back on the same session, up to `max_tool_rounds` rounds; the
        returned reply is the last one, with the earlier rounds in `previous`. A call the worker marked
        unrunnable (`error`) is answered with that error, so the model can correct itself.
        """
        request_id = request_id or uuid.uuid4().hex
        payload = self._body(message, session, request_id, fields)
        reply = await self._ask_once(project, payload, request_id, timeout_s, retries, session=session)
        rounds: list[Reply] = []
        follow = {k: v for k, v in fields.items() if k != "toolChoice"}  # forcing a call again would loop
        while on_tool is not None and reply.finish_reason == "tool_calls" and len(rounds) < max_tool_rounds:
            results = [{"toolCallId": str(c.get("id")), "content": await _run(on_tool, c)} for c in reply.tool_calls]
            rounds.append(reply)
            next_id = f"{request_id}.t{len(rounds)}"
            payload = self._body(None, session, next_id, {**follow, "toolResults": results})
            reply = await self._ask_once(project, payload, next_id, timeout_s, retries, session=session)
        return dataclasses.replace(reply, previous=tuple(rounds)) if rounds else reply

    async def _ask_once(
        self, project: str, payload: bytes, request_id: str, timeout_s: float, retries: int, *, session: str
    ) -> Reply:
        """Publish one request and wait for its final reply, resending it (same requestId) on a timeout."""
        shared = self._topics.user_input(project)
        async with self._inbox(project, request_id) as inbox:
            for attempt in range(retries + 1):
                direct = self._direct(project, session) if attempt == 0 else None
                await self._bus.publish(direct or shared, payload)
                try:
                    async with asyncio.timeout(timeout_s):
                        body = await self._next(inbox, payload, shared if direct else None)
                        while not body.get("done"):  # (a sticky worker's `accepted` comes first)
                            body = await inbox.get()
                        reply = _reply(body)
                        await self._remember(project, session, reply)
                        return reply
                except TimeoutError:
                    if attempt == retries:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _next(self, inbox: asyncio.Queue[dict[str, Any]], payload: bytes, fallback: str | None) -> dict[str, Any]:
        """The request's next message; with a `fallback`, it was sent to a sticky worker.

        If that worker says nothing for `affinity_timeout_s` or answers `overloaded`, the request goes to the
        shared topic too (the same requestId: answered once).
        """
        if fallback is None:
            return await inbox.get()
        try:
            async with asyncio.timeout(self._affinity_timeout_s):
                body = await inbox.get()
        except TimeoutError:
            body = {}
        busy = body.get("done") and (body.get("error") or {}).get("code") == "overloaded"
        if body and not busy:
            return body
        self.fallbacks += 1
        await self._bus.publish(fallback, payload)
        return await inbox.get()

    def _direct(self, project: str, session: str) -> str | None:
        """The sticky worker's own topic for this session, if it invited it and its status says `ready`."""
        worker = self._sticky.get((project, session)) if self._affinity else None
        return self._topics.direct_input(project, worker) if worker and self._workers.ready(worker, project) else None

    async def _remember(self, project: str, session: str, reply: Reply) -> None:
        """Stick the session to the worker its answer invited (a validated id: it becomes part of a topic)."""
        invited = reply.raw.get("affinity")
        worker = invited.get("worker") if isinstance(invited, dict) else None
        self._sticky.pop((project, session), None)
        if not (self._affinity and reply.ok and is_valid_id(worker)):
            return
        if not self._workers.watched:  # once per client: retained statuses arrive at once
            await self._workers.watch()
            with contextlib.suppress(TimeoutError):  # so the next turn can go direct already
                await self._workers.until(lambda: self._workers.ready(str(worker)), STATUS_GRACE_S)
        self._sticky[(project, session)] = str(worker)
        while len(self._sticky) > MAX_STICKY:
            del self._sticky[next(iter(self._sticky))]

    async def cancel(self, project: str, request_id: str) -> None:
        """Ask the worker to abort a request (its reply then carries error `cancelled`)."""
        body = {"requestId": request_id, "clientId": self.client_id}
        await self._bus.publish(self._topics.cancel(project), json.dumps(body).encode())

    async def reset(self, project: str, session: str, timeout_s: float = 10.0) -> bool:
        """Forget a session's history on the worker; True once the worker confirmed.

        The reset carries a requestId, so a fleet applies it once: a late copy never wipes later turns.
        """
        async with self._inbox(project, f"reset:{session}") as inbox:
            body = {"v": 2, "sessionId": session, "clientId": self.client_id, "requestId": uuid.uuid4().hex}
            await self._bus.publish(self._topics.session_reset(project), json.dumps(body).encode())
            try:
                async with asyncio.timeout(timeout_s):
                    while not (await inbox.get()).get("reset"):
                        continue
                    return True
            except TimeoutError:
                return False


async def _run(on_tool: ToolRunner, call: dict[str, Any]) -> str:
    """One call's result as the text sent back (a runner's exception is reported to the model, not raised)."""
    if call.get("error"):
        return f"error: {call['error']}"
    given = call.get("arguments")
    arguments: dict[str, Any] = given if isinstance(given, dict) else {}
    try:
        result = on_tool(str(call.get("name")), arguments)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:  # noqa: BLE001 - the tool's failure is the model's information
        return f"error: {type(exc).__name__}: {exc}"
    return result if isinstance(result, str) else json.dumps(result)


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
