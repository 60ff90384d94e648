"""`Bus`: paho-mqtt 2.x bridged to asyncio. The only importer of paho; it carries bytes, not protocol.

paho runs its network thread (`loop_start`): connect, keepalive and reconnect with backoff happen there.
Callbacks only hand work to the loop (`call_soon_threadsafe`; PUBACKs in batches) into a bounded queue;
a full queue parks the message, never drops it (it is not acked yet), and once `inbox_size` more are
parked paho's thread waits for the intake (TCP backpressure: bounded memory even on MQTT 3.1.1).
`subscribe` returns once the broker granted every filter, so `ready` is never announced for refused
topics. Every socket gets TCP_NODELAY (else a QoS1 round trip costs 40-90 ms); `suppress_exceptions`
keeps a raising callback from killing the thread. QoS1 publishes resolve on the broker's PUBACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from worker.config import BrokerConfig
from worker.errors import ConfigError
from worker.handoff import Handoff
from worker.message import InboundMessage

log = structlog.get_logger(__name__)

V5_PROBE_TIMEOUT_S = 3.0
SUBACK_TIMEOUT_S = 10.0
UNSUPPORTED_PROTOCOL = 132  # v5 CONNACK reason "Unsupported Protocol Version" (amqtt answers v5 with it)
NOT_AUTHORIZED = frozenset({4, 5, 134, 135})  # v3 rc 4/5, v5 "Bad user name or password"/"Not authorized"


class _ShutdownNoise(logging.Filter):
    """paho's network thread logs one ERROR "Client is not connected" after every clean disconnect."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("paho")
_PAHO_LOG.addFilter(_ShutdownNoise())


@dataclass(frozen=True, slots=True)
class Will:
    """Last Will: published by the broker if this client dies without a clean disconnect."""

    topic: str
    payload: bytes
    retain: bool = True


class BusConnectError(ConfigError):
    """The broker could not be reached or refused us."""


class BusSubscribeError(ConfigError):
    """The broker refused a subscription (an ACL that does not grant what PROTOCOL section 7 needs)."""


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
    ) -> None:
        self._cfg = cfg
        self._persistent = persistent
        self._receive_maximum = receive_maximum
        self._client_id = client_id
        self._will = will
        self._protocol = protocol or cfg.protocol
        self._inbox: asyncio.Queue[InboundMessage] = asyncio.Queue(inbox_size)
        self._parked: set[asyncio.Task[None]] = set()
        self._handoffs = threading.Semaphore(2 * inbox_size)
        """Messages handed to the loop and not yet taken by `messages()`: queued plus parked."""
        self._closing = threading.Event()
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._subscriptions: dict[str, int] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._acks: Handoff[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._connected = asyncio.Event()
        self._first_connack: asyncio.Future[ReasonCode | None] | None = None
        """Resolves with the first CONNACK's code, or None when the broker closed before answering."""
        self.is_v5 = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._acks = Handoff(self._loop, self._published)
        order = {"5": ["5"], "3.1.1": ["3.1.1"], "auto": ["5", "3.1.1"]}[self._protocol]
        for version in order:
            probe = version == "5" and len(order) > 1
            timeout_s = min(V5_PROBE_TIMEOUT_S, self._cfg.connect_timeout_s) if probe else self._cfg.connect_timeout_s
            connected, code = await self._connect(version, timeout_s, probe)
            if connected:
                return self
            refused_v5 = code is None or code.value == UNSUPPORTED_PROTOCOL
            if version == "5" and refused_v5 and "3.1.1" in order:
                log.info("bus.fallback_v311", reason="broker refused MQTT v5")
                continue
            host, port, _ = self._cfg.endpoint()
            if code is None:
                raise BusConnectError(f"broker {host}:{port} closed the connection before CONNACK")
            if code.value in NOT_AUTHORIZED:
                raise BusConnectError(f"broker {host}:{port} refused the credentials ({code})")
            raise BusConnectError(f"broker {host}:{port} refused the connection ({code})")
        raise BusConnectError("no MQTT protocol version accepted by the broker")  # pragma: no cover

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        self._closing.set()
        for task in self._parked:
            task.cancel()
        if client is not None:
            if client.is_connected():
                client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    def _make_client(self, version: str) -> mqtt.Client:
        v5 = version == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not self._persistent,
            manual_ack=True,
        )
        client.suppress_exceptions = True
        client.enable_logger(_PAHO_LOG)  # swallowed callback errors still get logged
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(self._cfg.max_queued_replies)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        if self._cfg.username:
            client.username_pw_set(self._cfg.username, self._cfg.secret())
        _, _, tls = self._cfg.endpoint()
        if tls:
            context = ssl.create_default_context(cafile=self._cfg.ca_file)
            if self._cfg.cert_file:
                context.load_cert_chain(self._cfg.cert_file, self._cfg.key_file)
            client.tls_set_context(context)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=1, retain=self._will.retain)
        return client

    async def _connect(self, version: str, timeout_s: float, probe: bool) -> tuple[bool, ReasonCode | None]:
        """Connect with one protocol version.

        Returns (True, None) on success, else (False, the refusal's reason code, or None when the broker
        closed the connection or, for a `probe`, did not answer in time: amqtt hangs on v5 CONNECTs that
        carry properties, such as a Last Will's).
        """
        assert self._loop is not None  # noqa: S101 - set in __aenter__
        host, port, _ = self._cfg.endpoint()
        client = self._make_client(version)
        self._first_connack = self._loop.create_future()
        self._client = client
        props = None
        if version == "5" and (self._persistent or self._receive_maximum):
            # (amqtt hangs on CONNECT properties: only the v5 probe, with its short timeout, may meet it)
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self._persistent:
                props.SessionExpiryInterval = self._cfg.session_expiry_s
            if self._receive_maximum:
                props.ReceiveMaximum = self._receive_maximum
        clean = not self._persistent if version == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        client.connect_async(host, port, keepalive=self._cfg.keepalive_s, clean_start=clean, properties=props)
        client.loop_start()
        try:
            async with asyncio.timeout(timeout_s):
                code = await self._first_connack
        except TimeoutError:
            await self._abandon(client)
            if probe:
                return False, None
            raise BusConnectError(f"cannot reach the MQTT broker at {host}:{port} within {timeout_s:.0f} s") from None
        if code is None or code.is_failure:
            await self._abandon(client)
            return False, code
        self.is_v5 = version == "5"
        log.info(
            "bus.connected",
            host=host,
            port=port,
            mqtt="5" if self.is_v5 else "3.1.1",
            client_id=self._client_id,
        )
        return True, None

    async def _abandon(self, client: mqtt.Client) -> None:
        """Stop a client that never got connected (no DISCONNECT to send)."""
        self._client = None
        await asyncio.to_thread(client.loop_stop)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # ---- paho network thread: hand everything to the loop, never block or raise ---------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:  # noqa: ANN401
        if not code.is_failure and self._subscriptions:
            client.subscribe(list(self._subscriptions.items()))  # restore after a reconnect
        assert self._loop is not None  # noqa: S101
        self._loop.call_soon_threadsafe(self._connack, code)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:  # noqa: ANN401
        assert self._loop is not None  # noqa: S101
        self._loop.call_soon_threadsafe(self._disconnected, code)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:  # noqa: ANN401
        props = getattr(msg, "properties", None)
        inbound = InboundMessage(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            mid=msg.mid,
            dup=bool(msg.dup),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            expiry_s=getattr(props, "MessageExpiryInterval", None),
            retain=bool(msg.retain),
        )
        assert self._loop is not None  # noqa: S101
        while not self._handoffs.acquire(timeout=0.5):  # backpressure: the intake is behind
            if self._closing.is_set():
                return
        self._loop.call_soon_threadsafe(self._enqueue, inbound)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:  # noqa: ANN401
        assert self._loop is not None  # noqa: S101
        self._loop.call_soon_threadsafe(self._subscribed, mid, list(codes))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _code: Any, _p: Any) -> None:  # noqa: ANN401
        assert self._acks is not None  # noqa: S101
        self._acks.put(mid)  # in batches: one loop wake-up for many PUBACKs

    # ---- event-loop side of the callbacks --------------------------------------------------------------
    def _connack(self, code: ReasonCode) -> None:
        if self._first_connack is not None and not self._first_connack.done():
            self._first_connack.set_result(code)
        if code.is_failure:
            return
        if self._connected.is_set():
            return
        self._connected.set()
        if self._subscriptions:
            log.info("bus.reconnected")

    def _disconnected(self, code: ReasonCode) -> None:
        if self._first_connack is not None and not self._first_connack.done():
            self._first_connack.set_result(None)
        if self._connected.is_set() and self._client is not None:
            log.warning("bus.disconnected", reason=str(code))
        self._connected.clear()

    def _enqueue(self, msg: InboundMessage) -> None:
        try:
            self._inbox.put_nowait(msg)
        except asyncio.QueueFull:
            # park: unacked, so nothing is lost; a queue put cannot fail, and __aexit__ cancels what is parked
            task = asyncio.ensure_future(self._inbox.put(msg))  # supervised: see the line above
            self._parked.add(task)
            task.add_done_callback(self._parked.discard)

    def _subscribed(self, mid: int, codes: list[ReasonCode]) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _published(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---- API -------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        return self._connected.is_set()

    def _require(self) -> mqtt.Client:
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
        assert self._loop is not None  # noqa: S101 - set in __aenter__
        result, mid = self._require().subscribe(list(new.items()))
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BusSubscribeError(f"cannot subscribe: {mqtt.error_string(result)}")
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
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
        """Stop receiving these topics."""
        gone = [t for t in topics if self._subscriptions.pop(t, None) is not None]
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
        wait: bool = True,
    ) -> None:
        """Publish; with QoS1 and `wait`, return once the broker has acked it (queued across reconnects)."""
        client = self._require()
        props = None
        if correlation_data is not None and self.is_v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation_data
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.error("bus.publish_dropped", topic=topic[:128], reason="outgoing queue full while disconnected")
            return
        if qos == 0 or not wait:
            return
        assert self._loop is not None  # noqa: S101
        fut = self._loop.create_future()
        self._pending[info.mid] = fut
        # NO_CONN: paho queued it and sends it after the reconnect (is_published() would raise then)
        if info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published():  # PUBACK raced ahead of the registration
            self._published(info.mid)
        await fut

    async def messages(self) -> InboundMessage:
        """The next inbound message (waits)."""
        msg = await self._inbox.get()
        self._handoffs.release()
        return msg

    def ack(self, msg: InboundMessage) -> None:
        """PUBACK a QoS1 message (manual ack: we decide when it counts as taken)."""
        if msg.qos > 0 and self._client is not None:
            with contextlib.suppress(ValueError):
                self._client.ack(msg.mid, msg.qos)


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:  # noqa: ANN401
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
