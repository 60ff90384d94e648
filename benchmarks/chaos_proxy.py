"""The chaos run's TCP proxy: each worker reaches the broker through one, so a dropped connection is real.

`drop` closes both sides of every live connection at once, as a NAT timeout or a pulled cable would look
to each end; the worker's reconnect goes through the proxy again (to a restarted broker, too).
"""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """A loopback TCP proxy to the broker; `drop` closes every current connection on both sides."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:  # the broker is down: the worker sees a closed connection and retries
            writer.close()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pumps = [asyncio.create_task(_pump(reader, up_writer)), asyncio.create_task(_pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pairs.discard(pair)
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for w in pair:
                w.close()

    def drop(self) -> int:
        """Close both sides of every live connection (an RST-free cut, like a NAT or a cable)."""
        pairs = list(self._pairs)
        for pair in pairs:
            for w in pair:
                w.close()
        return len(pairs)

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
