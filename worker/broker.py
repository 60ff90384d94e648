"""The embedded amqtt broker: zero-config MQTT for a single box (`vllm-worker` with no `--broker`).

amqtt 0.12 speaks MQTT 3.1.1 only, has no shared subscriptions, does not redeliver unacked QoS1
messages, and leaks retained messages to new clients; use Mosquitto in production (README). It binds
loopback by default. An explicit plugin list replaces amqtt's defaults, whose packet logger writes
plaintext passwords at DEBUG.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Self

import structlog

from worker.config import BrokerConfig
from worker.errors import ConfigError

log = structlog.get_logger(__name__)

_ANON = "amqtt.plugins.authentication.AnonymousAuthPlugin"


class EmbeddedBroker:
    """amqtt running on the worker's event loop."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self._host = cfg.embedded_host
        self._port = cfg.embedded_port
        self._broker: Any = None
        self.port = self._port

    async def __aenter__(self) -> Self:
        from amqtt.broker import Broker  # noqa: PLC0415 - only the embedded mode needs amqtt

        # amqtt logs every connection at INFO and full packets at DEBUG; keep it at warnings.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{self._port}"}},
            "plugins": {_ANON: {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as exc:
            raise ConfigError(
                f"cannot start the embedded MQTT broker on {self._host}:{self._port} ({exc}); "
                "is another broker running there? Pass --broker mqtt://host:port to use it."
            ) from exc
        # amqtt has no public accessor for the bound port (needed when port 0 asked the kernel).
        self.port = self._broker._servers["default"].instance.sockets[0].getsockname()[1]  # noqa: SLF001
        log.info("broker.started", host=self._host, port=self.port, kind="embedded amqtt (MQTT 3.1.1)")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
