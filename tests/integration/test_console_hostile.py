"""The console's fleet event streams against clients that never read: the server buffers a bounded amount
per stream, cuts slow streams off, and keeps answering pages and fast streams (in-process aiohttp server,
raw sockets for the slow clients, samples taken by hand instead of on a timer)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from support import free_port, until

from worker.console import samples as samples_module
from worker.console import server as server_module
from worker.console.samples import Samples
from worker.console.server import ConsoleApp
from worker.fleet.reports import ProcessReport, StatusReport, TelemetryReport
from worker.fleet.view import FleetState

SLOW_CLIENTS = 50
HIGH_WATER_BYTES = 64 * 1024  # asyncio's default write high-water mark; aiohttp drains past 64 KiB written
PER_STREAM_BOUND = 2 * HIGH_WATER_BYTES + samples_module.MAX_SAMPLE_BYTES + 1024


def busy_fleet(workers: int) -> FleetState:
    """Workers with enough projects that each sample fills MAX_SAMPLE_BYTES."""
    fleet = FleetState(clock=lambda: 1000.0)
    projects = [f"project-{i:02d}" for i in range(32)]
    for i in range(workers):
        wid = f"gpu-{i:03d}"
        status = StatusReport(
            state="ready", worker=wid, projects=projects, model="m" * 200, quantization="none", version="0", since="t"
        )
        tele = TelemetryReport(
            ts="t", worker=wid, model="m", quantization="none", process=ProcessReport(rss_mib=1, uptime_s=1)
        )
        assert fleet.handle(f"vllm-worker/{wid}/status", status.to_json())
        assert fleet.handle(f"vllm-worker/{wid}/telemetry", tele.to_json())
    return fleet


@pytest.fixture
async def console() -> AsyncIterator[tuple[ConsoleApp, str]]:
    fleet = busy_fleet(300)
    app = ConsoleApp(SimpleNamespace(client_id="test"), Samples(fleet, clock=lambda: 1000.0), token=None, hosts=None)
    for _ in range(40):  # about 10 MB of history: more than the kernel's socket buffers take
        app.tick()
    runner = web.AppRunner(app.app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def open_slow_clients(url: str, n: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks = []
    host, port = url.removeprefix("http://").split(":")
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(0.0)  # non-blocking, for the loop
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, b"GET /api/fleet/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        socks.append(sock)
    return socks


async def read_events(url: str, count: int) -> list[tuple[str, object]]:
    """The first `count` events of a stream, parsed strictly (as a browser would)."""
    events: list[tuple[str, object]] = []
    buffer = b""
    async with aiohttp.ClientSession() as session, session.get(url + "/api/fleet/events") as response:
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer and len(events) < count:
                event, buffer = buffer.split(b"\n\n", 1)
                name, data = event.split(b"\n", 1)
                events.append((name.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: "))))
            if len(events) == count:
                return events
    return events


async def test_slow_streams_stay_bounded_then_are_cut_off_and_pages_still_answer(console):
    app, url = console
    history_bytes = app._samples.history_bytes
    assert history_bytes > 8 * 2**20  # the setup is what it says
    socks = await open_slow_clients(url, SLOW_CLIENTS)
    try:
        await until(lambda: len(app.streams) == SLOW_CLIENTS)
        await until(lambda: all(s.transport.get_write_buffer_size() > 0 for s in app.streams))  # all stuck
        buffered = [s.transport.get_write_buffer_size() for s in app.streams]
        assert max(buffered) <= PER_STREAM_BOUND  # about one sample past the high-water mark, never the history
        async with aiohttp.ClientSession() as session, session.get(url + "/") as page:
            assert page.status == 200  # the page answers while 50 streams are stuck
        for _ in range(server_module.STREAM_QUEUE + 1):
            app.tick()
            await asyncio.sleep(0)  # let the handlers run between samples
        await until(lambda: not app.streams)
        assert app.streams_cut == SLOW_CLIENTS  # cut off, not buffered
    finally:
        for sock in socks:
            sock.close()


async def test_a_fast_client_gets_the_shared_history_then_each_sample(console):
    app, url = console
    reader = asyncio.create_task(read_events(url, 2))
    await until(lambda: len(app.streams) == 1 or reader.done())
    app.tick()
    events = await asyncio.wait_for(reader, 30)
    (first, history), (second, sample) = events
    assert first == "history"
    assert isinstance(history, dict)
    assert len(history["samples"]) == 40
    assert second == "sample"
    assert isinstance(sample, dict)
    assert {w["worker"] for w in sample["workers"]} <= {f"gpu-{i:03d}" for i in range(300)}
    assert app.streams_cut == 0
