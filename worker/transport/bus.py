"""`Bus`: paho-mqtt 2.x on asyncio. With `pahoio` and `mqttclient`, the only importers of paho; it carries bytes.

paho runs on the event loop's thread (`pahoio.Driver`: no network thread, no cross-thread hand-over), so
its callbacks run here and act directly. Connect tries MQTT v5, then 3.1.1 (amqtt); after a lost
connection `_keep_connected` reconnects with backoff (1 s doubling to 30 s) and restores subscriptions.
Inbound messages queue unacked; once `2 x inbox_size` wait for the intake, reading the socket pauses
until half are taken (TCP backpressure: bounded memory even on MQTT 3.1.1). `subscribe` returns once the
broker granted every filter, so `ready` is never announced for refused topics. QoS1 publishes resolve on
the broker's PUBACK. If the driver fails, `messages()` raises: the intake dies loudly, never deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from worker.config import BrokerConfig
from worker.errors import ConfigError, PublishError
from worker.message import InboundMessage, is_mqtt_text
from worker.transport.connect import (
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    Attempt,
    BusConnectError,
    attempts,
    clean_start,
    connect_properties,
    falls_back,
    open_until_answered,
    refusal,
)
from worker.transport.mqttclient import Will, make_client, tls_context
from worker.transport.pahoclient import LoopClient, correlated
from worker.transport.pahoio import Driver

log = structlog.get_logger(__name__)
CONNECTED = ReasonCode(PacketTypes.CONNACK, identifier=0)

SUBACK_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 1.0
__all__ = ["Bus", "BusConnectError", "BusFailedError", "BusLostError", "BusSubscribeError"]


class BusSubscribeError(ConfigError):
    """The broker refused a subscription (an ACL that does not grant what PROTOCOL section 7 needs)."""


class BusFailedError(RuntimeError):
    """The connection's driver failed; nothing more will be received (the process must stop)."""


class BusLostError(ConnectionError):
    """A bus made with `reconnect=False` lost its connection (e.g. the session's owner came back)."""


class Bus:
    """One MQTT connection; see the module docstring."""

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        will: Will | None = None,
        inbox_size: int = 256,
        protocol: str | None = None,
        *,
        persistent: bool = False,
        receive_maximum: int | None = None,
        max_packet_bytes: int | None = None,
        reconnect: bool = True,
    ) -> None:
        self._cfg = cfg
        self._persistent = persistent
        self._receive_maximum = receive_maximum
        self._max_packet_bytes = max_packet_bytes
        self._reconnect = reconnect
        self.end_session = False
        """Set before closing: the DISCONNECT carries Session Expiry 0, so the broker drops the session."""
        self._client_id = client_id
        self._will = will
        self._protocol = protocol or cfg.protocol
        self._inbox: asyncio.Queue[InboundMessage | None] = asyncio.Queue()  # None: the driver failed
        self._high, self._low = 2 * inbox_size, inbox_size
        self._failure: BaseException | None = None
        self._closing = False
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._subscriptions: dict[str, int] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._unacked: set[int] = set()
        self._client: LoopClient | None = None
        self._driver: Driver | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._backoff_s = RECONNECT_MIN_S
        self._connected = asyncio.Event()
        self._first_connack: asyncio.Future[ReasonCode | None] | None = None  # None: closed, no CONNACK
        self.is_v5 = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        for attempt in attempts(self._cfg, self._protocol):
            code = await self._connect(attempt)
            if code is CONNECTED:
                self._keeper = asyncio.create_task(self._keep_connected())  # supervised: _kept, then messages()
                self._keeper.add_done_callback(self._kept)
                return self
            if falls_back(attempt, code):
                log.info("bus.fallback_v311", reason="broker refused MQTT v5")
                continue
            raise refusal(self._cfg, code)
        raise BusConnectError("no MQTT protocol version accepted by the broker")  # pragma: no cover

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
        client, driver = self._client, self._driver
        self._client = None
        if client is not None and driver is not None:
            if client.is_connected():
                props = None
                if self.end_session and self.is_v5:
                    props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = 0
                client.disconnect(properties=props)  # paho closes the socket once DISCONNECT is written
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await driver.closed.wait()
            driver.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    def _make_client(self, version: str) -> LoopClient:
        client = make_client(self._cfg, self._client_id, version, persistent=self._persistent, will=self._will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    async def _connect(self, attempt: Attempt) -> ReasonCode | None:
        """Connect with one protocol version, retrying refused TCP connects until its timeout.

        Returns `CONNECTED`, else the refusal's reason code, or None when the broker closed the connection
        or, for a probe, did not answer in time.
        """
        host, port, _ = self._cfg.endpoint()
        client = self._make_client(attempt.version)
        driver = Driver(client, (host, port), tls_context(self._cfg), self._cfg.connect_timeout_s, self._fail)
        self._first_connack = connack = asyncio.get_running_loop().create_future()
        self._client, self._driver = client, driver
        props = connect_properties(
            self._cfg,
            attempt.version,
            persistent=self._persistent,
            receive_maximum=self._receive_maximum,
            max_packet_bytes=self._max_packet_bytes,
        )
        clean = clean_start(attempt.version, persistent=self._persistent)
        client.connect_async(host, port, keepalive=self._cfg.keepalive_s, clean_start=clean, properties=props)
        try:
            async with asyncio.timeout(attempt.timeout_s):
                code = await open_until_answered(self._cfg, driver, connack)
        except TimeoutError:
            driver.close()  # never connected: no DISCONNECT to send
            self._client = self._driver = None
            if attempt.probe:
                return None
            raise BusConnectError(
                f"cannot reach the MQTT broker at {host}:{port} within {attempt.timeout_s:.0f} s"
            ) from None
        if code is None or code.is_failure:
            driver.close()
            self._client = self._driver = None
            return code
        self.is_v5 = attempt.version == "5"
        log.info("bus.connected", host=host, port=port, mqtt="5" if self.is_v5 else "3.1.1", client_id=self._client_id)
        return CONNECTED

    async def _keep_connected(self) -> None:
        """After a lost connection: reconnect with backoff (1 s doubling to 30 s; a CONNACK resets it)."""
        while True:
            await self._lost.wait()
            self._lost.clear()
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(2 * self._backoff_s, RECONNECT_MAX_S)
            if self._driver is None or self._closing:
                return
            if self._connected.is_set():  # back already (never reopen a live connection)
                continue
            try:
                await self._driver.open()
            except OSError as exc:
                log.info("bus.reconnect_failed", error=type(exc).__name__, retry_s=self._backoff_s)
                self._lost.set()

    def _kept(self, task: asyncio.Task[None]) -> None:
        if not self._closing:
            self._fail(task.exception() if not task.cancelled() else asyncio.CancelledError())

    def _fail(self, exc: BaseException | None) -> None:
        """The driver or the reconnect loop died: make `messages()` raise so the process stops loudly."""
        self._failure = exc or RuntimeError("reconnect loop ended")
        if not isinstance(exc, BusLostError):
            log.critical("bus.failed", exc_info=self._failure)
        self._inbox.put_nowait(None)

    # ---- paho callbacks (on the loop's thread, inside loop_read/loop_write/loop_misc): never raise ----
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:  # noqa: ANN401
        if not code.is_failure and self._subscriptions:
            client.subscribe(list(self._subscriptions.items()))  # restore after a reconnect
        if self._first_connack is not None and not self._first_connack.done():
            self._first_connack.set_result(code)
        if code.is_failure or self._connected.is_set():
            return
        self._backoff_s = RECONNECT_MIN_S
        self._connected.set()
        if self._subscriptions:
            log.info("bus.reconnected")

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:  # noqa: ANN401
        if self._first_connack is not None and not self._first_connack.done():
            self._first_connack.set_result(None)
        if client is not self._client:
            return
        if self._connected.is_set():
            log.warning("bus.disconnected", reason=str(code), client_id=self._client_id)
        self._connected.clear()
        self._unacked.clear()  # the broker redelivers them (persistent session) or forgets them
        if not self._reconnect and not self._closing:  # a borrowed session handed back: end, never fight for it
            self._fail(BusLostError("the connection was closed and this bus does not reconnect"))
        elif not self._closing and self._keeper is not None:  # (a refused first attempt is _connect's to handle)
            self._lost.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:  # noqa: ANN401
        props = getattr(msg, "properties", None)
        if msg.qos > 0:
            self._unacked.add(msg.mid)
        self._inbox.put_nowait(
            InboundMessage(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=msg.mid,
                dup=bool(msg.dup),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
                expiry_s=getattr(props, "MessageExpiryInterval", None),
                retain=bool(msg.retain),
                violation=self._client.violation if self._client is not None else None,
            )
        )
        if self._inbox.qsize() >= self._high and self._driver is not None:
            self._driver.pause_reading()  # backpressure: the intake is behind

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:  # noqa: ANN401
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(list(codes))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _code: Any, _p: Any) -> None:  # noqa: ANN401
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---- API -------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        return self._connected.is_set()

    def _require(self) -> LoopClient:
        if self._client is None:
            raise RuntimeError("bus is not connected")
        return self._client

    @property
    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) of the broker."""
        return self._cfg.endpoint()

    async def subscribe(self, topics: Iterable[str], qos: int = 1) -> None:
        """Subscribe now (returning once the broker granted every filter) and after every reconnect.

        Raises `BusSubscribeError` when the broker refuses a filter or grants less than `qos`.
        """
        new = dict.fromkeys(topics, qos)
        self._subscriptions.update(new)
        result, mid = self._require().subscribe(list(new.items()))
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BusSubscribeError(f"cannot subscribe: {mqtt.error_string(result)}")
        fut: asyncio.Future[list[ReasonCode]] = asyncio.get_running_loop().create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(SUBACK_TIMEOUT_S):
                codes = await fut
        except TimeoutError:
            raise BusSubscribeError(f"no SUBACK from the broker within {SUBACK_TIMEOUT_S:.0f} s") from None
        finally:
            self._subacks.pop(mid, None)
        refused = [t for t, code in zip(new, codes, strict=False) if code.is_failure or code.value < qos]
        if refused or len(codes) != len(new):
            raise BusSubscribeError(f"the broker refused the subscription to {', '.join(refused) or 'some filters'}")

    async def unsubscribe(self, topics: Iterable[str]) -> None:
        """Stop receiving these topics (also ones a resumed persistent session holds from an earlier owner)."""
        gone = list(topics)
        for topic in gone:
            self._subscriptions.pop(topic, None)
        if gone and self._client is not None:
            self._client.unsubscribe(gone)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        wait: bool = True,
    ) -> None:
        """Publish; with QoS1 and `wait`, return once the broker has acked it (queued across reconnects).

        On MQTT 5 `correlation_data` and `response_topic` travel as properties (3.1.1 has none).

        Raises `PublishError`, having sent nothing, for a topic that is not MQTT text (the broker would drop
        the whole connection, and paho would resend the packet after every reconnect) or one paho refuses.
        """
        client = self._require()
        if not is_mqtt_text(topic):
            raise PublishError(f"topic {topic[:64]!r} is not MQTT 5 text")
        props = correlated(correlation_data) if correlation_data is not None and self.is_v5 else None
        if response_topic is not None and self.is_v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, UnicodeError) as exc:  # wildcards, an empty or oversize topic, an oversize payload
            raise PublishError(f"cannot publish to {topic[:64]!r}: {exc}") from None
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.error("bus.publish_dropped", topic=topic[:128], reason="outgoing queue full while disconnected")
            return
        if qos == 0 or not wait:
            return
        # (NO_CONN: paho queued it and sends it after the reconnect.) The PUBACK cannot race ahead of this
        # registration: paho reads it on this thread, in a later loop turn.
        fut = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        await fut

    async def messages(self) -> InboundMessage:
        """The next inbound message (waits). Raises `BusFailedError` once the connection's driver failed."""
        msg = await self._inbox.get()
        if msg is None:
            self._inbox.put_nowait(None)  # for every other reader too
            raise BusFailedError("the MQTT connection's driver failed") from self._failure
        if self._inbox.qsize() < self._low and self._driver is not None:
            self._driver.resume_reading()
        return msg

    def ack(self, msg: InboundMessage) -> None:
        """PUBACK a QoS1 message (manual ack: we decide when it counts as taken)."""
        if msg.qos > 0 and self._client is not None and msg.mid in self._unacked:
            self._unacked.discard(msg.mid)
            with contextlib.suppress(ValueError):
                self._client.ack(msg.mid, msg.qos)

    @property
    def unacked(self) -> int:
        """QoS1 messages received on this connection and not acked yet (telemetry: 0 when idle)."""
        return len(self._unacked)
