"""`Driver`: one paho-mqtt client run by the asyncio event loop, with no network thread.

paho's threaded mode (`loop_start`) costs, per publish, a wake-up byte on a socketpair, a lock, and a GIL
hand-over to its network thread, and every PUBACK crosses back: about half of the worker's front-end
CPU at concurrency 32 (issue 16's profile). Here every paho call happens on the loop's thread:
- the loop's selector watches the socket and calls `loop_read`; paho reads a packet in three `recv`s,
  so `Buffered` serves them from one large `recv`;
- whatever is published during one loop turn goes out at the end of that turn in one `send` (`Buffered`
  holds paho's per-packet sends), and the selector watches for writability only while the kernel's
  buffer is full;
- a 1 s timer calls `loop_misc` (keepalive: PINGREQ, and a dead connection is closed);
- reading pauses on request (`pause_reading`): TCP backpressure when the consumer is behind.
Only the blocking part of a connect, the TCP connect and the TLS handshake, runs in a thread, on a socket
paho does not know yet; `reconnect()` then adopts it (`pahoclient.LoopClient`) and queues CONNECT, on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from worker.transport.pahoclient import LoopClient

TICK_S = 1.0
READ_CHUNK = 65536

Sock = socket.socket | ssl.SSLSocket


class Buffered:
    """paho's socket, buffered both ways.

    Its sends are held until `write_held` (one syscall per loop turn), and its small reads (a packet's
    type byte, length bytes, body) are served from one large `recv`.
    """

    def __init__(self, sock: Sock) -> None:
        self.sock = sock
        self.held = bytearray()
        self._rbuf = b""
        self._rpos = 0

    def fileno(self) -> int:
        """The socket's (for the selector)."""
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        """As the socket's."""
        self.sock.setblocking(flag)

    def send(self, data: bytes | bytearray) -> int:
        """Hold `data`; all of it counts as sent."""
        self.held += data
        return len(data)

    def recv(self, n: int) -> bytes:
        """Up to `n` bytes, from the buffer or one large read; as the socket's otherwise (b"" at EOF)."""
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            buf, pos = self.sock.recv(max(n, READ_CHUNK)), 0  # raises BlockingIOError when there is none
            if len(buf) <= n:
                self._rbuf, self._rpos = b"", 0
                return buf
        out = buf[pos : pos + n]
        pos += len(out)
        # once consumed, let the read go (an idle connection holds no buffer)
        self._rbuf, self._rpos = (buf, pos) if pos < len(buf) else (b"", 0)
        return out

    def pending(self) -> int:
        """Bytes read from the kernel that paho has not taken yet (the selector cannot see them)."""
        tls = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        return len(self._rbuf) - self._rpos + tls

    def write_held(self) -> bool:
        """Send what paho wrote; False when the kernel's buffer is full (the rest stays held)."""
        while self.held:
            try:
                sent = self.sock.send(self.held)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del self.held[:sent]
        return True

    def shutdown(self, how: int) -> None:
        """As the socket's."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close, sending what is held first (paho closes right after writing DISCONNECT); never blocks."""
        with contextlib.suppress(OSError):
            self.write_held()
        self.sock.close()


class Driver:
    """Runs `client` on the running loop; see the module docstring. Construct it on the loop."""

    def __init__(
        self,
        client: LoopClient,
        endpoint: tuple[str, int],
        tls: ssl.SSLContext | None,
        timeout_s: float,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._endpoint = endpoint
        self._tls = tls
        self._timeout_s = timeout_s
        self._on_failure = on_failure
        self._sock: Buffered | None = None
        self._paused = False
        self._flush_due = False
        self._watching_write = False
        self._tick: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()
        """Set while paho has no socket (before the first connect and after every close)."""
        self.closed.set()
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write

    # ---- connecting ------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the TCP (+TLS) connection in a thread, then let paho send CONNECT on it. Raises OSError."""
        opening = _Opening(self._endpoint, self._tls, self._timeout_s)
        try:
            sock = await asyncio.to_thread(opening.run)
        except asyncio.CancelledError:
            opening.abandon()
            raise
        self._client.adopted = Buffered(sock)
        self._client.reconnect()  # paho: adopts the socket (-> _opened), queues CONNECT (-> _want_write)

    def drop(self) -> None:
        """Cut the connection; paho notices on its next read and closes it its own way (on_disconnect)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Forget the socket without telling paho (for a client that is being thrown away)."""
        sock = self._sock
        if sock is not None:
            self._closed(self._client, None, sock)
            with contextlib.suppress(OSError):
                sock.close()

    # ---- reading ---------------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop reading the socket (the broker then stops sending: TCP backpressure)."""
        if not self._paused:
            self._paused = True
            if self._sock is not None:
                self._loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        """Undo `pause_reading`."""
        if self._paused:
            self._paused = False
            if self._sock is not None:
                self._loop.add_reader(self._sock, self._read)
                self._loop.call_soon(self._read)  # what was read before the pause: the selector cannot see it

    def _read(self, force: bool = False) -> None:
        sock = self._sock
        if sock is None or (self._paused and not force):
            return
        try:
            self._client.loop_read()
            while sock is self._sock and not self._paused and sock.pending():  # buffered: the selector is blind
                self._client.loop_read()
        except Exception as exc:  # noqa: BLE001 - paho is not expected to raise here; if it does, stop loudly
            self._fail(exc)
            return
        self._write_held()  # e.g. what paho wrote on CONNACK

    # ---- writing ---------------------------------------------------------------------------------------
    def _want_write(self, _c: mqtt.Client, _u: Any, _s: Any) -> None:  # noqa: ANN401
        if not self._flush_due:  # one flush per loop turn, however many publishes queued data in it
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        try:
            self._client.loop_write()  # into Buffered.held: never blocks
        except Exception as exc:  # noqa: BLE001 - as in _read
            self._fail(exc)
            return
        self._write_held()

    def _write_held(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            done = sock.write_held()
        except OSError:  # reset or broken: paho believes it sent; let it find out the way it reads
            sock.held.clear()
            self.drop()
            self._loop.call_soon(functools.partial(self._read, force=True))  # even while paused
            return
        if done == self._watching_write:  # the kernel's buffer filled up, or drained again
            self._watching_write = not done
            if done:
                self._loop.remove_writer(sock)
            else:
                self._loop.add_writer(sock, self._flush)

    # ---- socket lifecycle (paho calls these on the loop's thread) -----------------------------------
    def _opened(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:  # noqa: ANN401
        self._sock = sock
        self.closed.clear()
        if not self._paused:
            self._loop.add_reader(sock, self._read)
        self._tick = self._loop.call_later(TICK_S, self._misc)

    def _closed(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:  # noqa: ANN401
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._watching_write = False
        self._sock = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self.closed.set()

    def _misc(self) -> None:
        self._tick = self._loop.call_later(TICK_S, self._misc)  # before: loop_misc may close (-> _closed)
        try:
            self._client.loop_misc()
        except Exception as exc:  # noqa: BLE001 - as in _read
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.close()
        self._on_failure(exc)


class _Opening:
    """One TCP (+TLS) connect in a worker thread; a socket finished after its caller gave up is closed."""

    def __init__(self, endpoint: tuple[str, int], tls: ssl.SSLContext | None, timeout_s: float) -> None:
        self._endpoint = endpoint
        self._tls = tls
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._abandoned = False
        self._done: Sock | None = None

    def run(self) -> Sock:
        sock: Sock = socket.create_connection(self._endpoint, timeout=self._timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else a QoS1 round trip costs 40-90 ms
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._endpoint[0])  # handshakes, verifies
        except BaseException:
            sock.close()
            raise
        with self._lock:
            if self._abandoned:
                sock.close()
                raise ConnectionAbortedError("the connect was given up")
            self._done = sock
        return sock

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._done is not None:
                self._done.close()
