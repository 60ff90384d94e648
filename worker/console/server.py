"""The console's web server (aiohttp): pages, the fleet event stream, usage and the playground API.

One MQTT connection (`Client`) carries both: the fleet's status/telemetry (watched) and the playground's
v2 requests. The browser gets data, never markup: pages render every broker-sourced string as text.

Who may use it: bound to loopback, anyone on this machine (like `vllm-worker ask`); bound elsewhere, only
with the token (`?token=` once, then an HttpOnly SameSite=Strict cookie). Always: the Host header must be
one we serve (DNS rebinding), and a POST must be JSON from our own origin (CSRF). The broker's password
stays in this process.

Event streams share bytes: each sample is encoded once (see `samples`) and queued by reference to every
stream; a stream whose client does not keep up (`STREAM_QUEUE` samples behind) is cut off, never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from worker.client import Client
from worker.console.samples import SAMPLE_S, Samples
from worker.console.usage import UsageView
from worker.protocol import is_valid_id

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "vw_console"
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 32_000
MAX_PROJECTS = 256
STREAM_QUEUE = 10
"""Samples a stream may fall behind (its client not reading) before it is cut off."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(eq=False)
class Stream:
    """One open fleet event stream: the samples it has yet to send (shared bytes, never copies)."""

    transport: asyncio.Transport
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))


class ConsoleApp:
    """Routes and their state; `run_sampler` is the one background loop (supervised by the caller)."""

    def __init__(
        self,
        client: Client,
        samples: Samples,
        *,
        token: str | None,
        hosts: set[str] | None,
        usage: UsageView | None = None,
    ) -> None:
        self._client = client
        self._samples = samples
        self._usage = usage
        self._token = token
        self._hosts = hosts  # None: any Host (bound to a public address, the token guards it)
        self.streams: set[Stream] = set()
        self.streams_cut = 0
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        self.app.add_routes(
            [
                web.get("/", self._page("fleet.html")),
                web.get("/playground", self._page("playground.html")),
                web.get("/usage", self._page("usage.html")),
                web.get("/api/usage", self._usage_data),
                web.get("/api/fleet/events", self._fleet_events),
                web.get("/api/projects", self._projects),
                web.post("/api/ask", self._ask),
                web.post("/api/cancel", self._cancel),
                web.post("/api/reset", self._reset),
                web.static("/static", STATIC, append_version=False),
            ]
        )
        self.app.on_shutdown.append(self._cut_streams)

    async def run_sampler(self) -> None:
        """Take a fleet sample every SAMPLE_S and hand it to every open event stream."""
        while True:
            self.tick()
            await asyncio.sleep(SAMPLE_S)

    def tick(self) -> None:
        """One sample, encoded once, queued to every stream; a stream with a full queue is cut off."""
        event = b"event: sample\ndata: " + self._samples.take() + b"\n\n"
        for stream in list(self.streams):
            try:
                stream.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.streams_cut += 1
                self._cut(stream)

    async def _cut_streams(self, _app: web.Application) -> None:
        """On shutdown: open streams never end by themselves, so the server would wait out its timeout."""
        for stream in list(self.streams):
            self._cut(stream)

    def _cut(self, stream: Stream) -> None:
        """Close a stream now: its buffer is freed, and its handler's pending write or wait ends."""
        self.streams.discard(stream)
        stream.transport.abort()
        with contextlib.suppress(asyncio.QueueFull):  # full: the handler is in a write, which now fails
            stream.queue.put_nowait(b"")

    # ---- guard -----------------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._hosts is not None and (request.host.rsplit(":", 1)[0].strip("[]") not in self._hosts):
            return web.Response(status=403, text="unknown host")
        supplied = request.query.get("token") or request.cookies.get(COOKIE) or ""
        if self._token is not None and not hmac.compare_digest(supplied.encode(), self._token.encode()):
            return web.Response(status=401, text="this console needs its token: open the URL it printed")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if request.content_type != "application/json" or (origin and urlsplit(origin).netloc != request.host):
                return web.Response(status=403, text="JSON from this console's own pages only")
        response = await handler(request)
        if self._token is not None and request.query.get("token"):
            response.set_cookie(COOKIE, self._token, httponly=True, samesite="Strict")
        response.headers["Content-Security-Policy"] = "default-src 'self'; object-src 'none'; base-uri 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # ---- pages and fleet ---------------------------------------------------------------------------------
    def _page(self, name: str) -> Handler:
        async def page(_request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

        return page

    async def _usage_data(self, _request: web.Request) -> web.StreamResponse:
        if self._usage is None:
            return web.json_response({"source": "none", "projects": [], "days": []})
        return web.json_response(await self._usage.snapshot(), headers={"Cache-Control": "no-store"})

    async def _projects(self, _request: web.Request) -> web.StreamResponse:
        projects = [p for p in self._samples.projects() if is_valid_id(p)][:MAX_PROJECTS]
        return web.json_response({"projects": projects, "clientId": self._client.client_id})

    async def _fleet_events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the last 15 minutes at once, then one sample a second.

        Written a sample at a time (each write waits for the socket to drain), so a stream buffers at most
        about one sample plus the transport's high-water mark, and the history is never copied whole.
        """
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if request.transport is None:  # the client left before the headers went out
            return response
        stream = Stream(request.transport)
        self.streams.add(stream)
        try:
            for piece in _history_event(list(self._samples.history)):
                await response.write(piece)
            while event := await stream.queue.get():  # empty: cut off
                await response.write(event)
        except ConnectionError:  # the client left, or `tick` cut it off
            pass
        finally:
            self.streams.discard(stream)
        return response

    # ---- playground ------------------------------------------------------------------------------------
    async def _ask(self, request: web.Request) -> web.StreamResponse:
        """Stream one v2 request's chunks and final reply to the browser as Server-Sent Events."""
        body = await _json(request)
        body.setdefault("requestId", uuid.uuid4().hex)
        ids, message = _ids(body, "project", "session", "requestId"), body.get("message")
        if ids is None:
            return web.json_response({"error": "project, session and requestId must be ids"}, status=400)
        project, session, request_id = ids
        if not isinstance(message, str) or not 0 < len(message) <= MAX_MESSAGE_CHARS:
            return web.json_response({"error": f"message must be 1-{MAX_MESSAGE_CHARS} characters"}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for chunk in self._client.stream(project, message, session=session, request_id=request_id):
                if chunk.done and chunk.reply is not None:
                    await response.write(_event("done", chunk.reply.raw))
                elif chunk.event is not None:  # a tool call or its result, as it happens
                    await response.write(_event("tool", chunk.event))
                else:
                    await response.write(_event("chunk", {"seq": chunk.seq, "delta": chunk.delta}))
        except TimeoutError:
            await response.write(_event("failed", {"message": "no answer: is a worker serving this project?"}))
        except ConnectionResetError:  # the browser went away: stop the generation too
            await self._client.cancel(project, request_id)
        return response

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        ids = _ids(await _json(request), "project", "requestId")
        if ids is None:
            return web.json_response({"error": "project and requestId must be ids"}, status=400)
        await self._client.cancel(*ids)
        return web.json_response({"sent": True})

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        ids = _ids(await _json(request), "project", "session")
        if ids is None:
            return web.json_response({"error": "project and session must be ids"}, status=400)
        return web.json_response({"reset": await self._client.reset(ids[0], ids[1])})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _ids(body: dict[str, Any], *names: str) -> list[str] | None:
    """The named fields when every one is a protocol id (topic-safe), else None."""
    values = [body.get(name) for name in names]
    return [str(v) for v in values] if all(is_valid_id(v) for v in values) else None


def _history_event(samples: list[bytes]) -> Iterator[bytes]:
    """The `history` event in pieces of at most one sample, from the samples' own bytes."""
    yield b'event: history\ndata: {"samples":['
    for i, sample in enumerate(samples):
        yield b"," + sample if i else sample
    yield b"]}\n\n"


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
