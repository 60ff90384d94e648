"""The embedded amqtt broker: zero-config MQTT for a single box (`vllm-worker` with no `--broker`).

amqtt 0.12 speaks MQTT 3.1.1 only, has no shared subscriptions, does not redeliver unacked QoS1
messages, and leaks retained messages to new clients; use Mosquitto in production (README). It binds
loopback by default. An explicit plugin list replaces amqtt's defaults, whose packet logger writes
plaintext passwords at DEBUG.

By default it runs in a child process (`python -m worker.transport.broker`): in the worker's own process it
shares the GIL with the engine's output handling, and the benchmark measured it as the largest cost on
the request path (about a quarter of the worker process's CPU at 32 concurrent streams). The child exits
when its stdin closes, so it never outlives the worker, even after a SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import threading
from types import TracebackType
from typing import Any, Self

import structlog

from worker.config import BrokerConfig
from worker.errors import ConfigError

log = structlog.get_logger(__name__)

_ANON = "amqtt.plugins.authentication.AnonymousAuthPlugin"
START_TIMEOUT_S = 30.0


async def _start_amqtt(host: str, port: int) -> tuple[Any, int]:
    from amqtt.broker import Broker  # noqa: PLC0415 - only the embedded mode needs amqtt

    for noisy in ("amqtt", "transitions"):  # amqtt logs each client's state machine at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {_ANON: {"allow_anonymous": True}},
    }
    broker = Broker(config)
    try:
        await broker.start()
    except Exception as exc:
        raise ConfigError(
            f"cannot start the embedded MQTT broker on {host}:{port} ({exc}); "
            "is another broker running there? Pass --broker mqtt://host:port to use it."
        ) from exc
    # amqtt has no public accessor for the bound port (needed when port 0 asked the kernel).
    bound = broker._servers["default"].instance.sockets[0].getsockname()[1]  # noqa: SLF001
    return broker, int(bound)


class EmbeddedBroker:
    """amqtt in a child process (default) or on this event loop (`in_process=True`)."""

    def __init__(self, cfg: BrokerConfig, in_process: bool = False) -> None:
        self._host = cfg.embedded_host
        self._port = cfg.embedded_port
        self._in_process = in_process
        self._broker: Any = None
        self._proc: subprocess.Popen[str] | None = None
        self.port = self._port

    async def __aenter__(self) -> Self:
        if self._in_process:
            self._broker, self.port = await _start_amqtt(self._host, self._port)
        else:
            self.port = await asyncio.to_thread(self._spawn)
        where = "in-process" if self._in_process else f"child pid {self._proc.pid if self._proc else '?'}"
        log.info("broker.started", host=self._host, port=self.port, kind=f"embedded amqtt (MQTT 3.1.1, {where})")
        return self

    def _spawn(self) -> int:
        cmd = [sys.executable, "-m", "worker.transport.broker", "--host", self._host, "--port", str(self._port)]
        # Its own session: a terminal's Ctrl-C (sent to the whole foreground group) must reach the worker
        # only, which keeps the broker until it has published `draining` and `offline`, then closes stdin.
        self._proc = subprocess.Popen(  # noqa: S603 - our own module
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True
        )
        assert self._proc.stdout is not None  # noqa: S101
        line = self._proc.stdout.readline()  # "PORT <n>" once listening, or nothing if it failed
        if not line.startswith("PORT "):
            self._proc.wait(START_TIMEOUT_S)
            raise ConfigError(
                f"cannot start the embedded MQTT broker on {self._host}:{self._port}; is another broker running "
                "there? Pass --broker mqtt://host:port to use it, or --port to pick another port."
            )
        return int(line.split()[1])

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.to_thread(_stop_child, proc)


def _stop_child(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()  # closing stdin is the child's stop signal
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def _serve(host: str, port: int) -> None:
    broker, bound = await _start_amqtt(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def watch_parent() -> None:
        sys.stdin.read()  # returns at EOF: the worker closed the pipe or died
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_parent, daemon=True).start()
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    await stop.wait()
    await broker.shutdown()


def main() -> int:
    """Child-process entry point: serve until stdin closes or SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m worker.transport.broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="amqtt %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args.host, args.port))
    except ConfigError as exc:
        sys.stderr.write(f"vllm-worker broker: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
