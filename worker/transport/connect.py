"""How a connection is negotiated: which MQTT versions to try, what CONNECT carries, what a refusal means.

`Bus` connects with `auto`: MQTT v5 first, with a short probe timeout (amqtt hangs on v5 CONNECTs that
carry properties), then 3.1.1 when the broker refused or ignored v5. A refused TCP connect is retried
until the connect timeout (the broker may still be starting); a refused CONNECT becomes one
`BusConnectError` that names the cause an operator can fix.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from worker.config import BrokerConfig
from worker.errors import ConfigError
from worker.transport.pahoio import Driver

log = structlog.get_logger(__name__)

V5_PROBE_TIMEOUT_S = 3.0
UNSUPPORTED_PROTOCOL = 132  # v5 CONNACK reason "Unsupported Protocol Version" (amqtt answers v5 with it)
NOT_AUTHORIZED = frozenset({4, 5, 134, 135})  # v3 rc 4/5, v5 "Bad user name or password"/"Not authorized"
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0


class BusConnectError(ConfigError):
    """The broker could not be reached or refused us."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One protocol version to try, and how long to wait for its CONNACK."""

    version: str
    timeout_s: float
    probe: bool
    """A v5 probe with a fallback behind it: no answer in time means "try 3.1.1", not an error."""


def attempts(cfg: BrokerConfig, protocol: str) -> list[Attempt]:
    """The versions `protocol` allows, in order (`auto`: v5 as a short probe, then 3.1.1)."""
    order = {"5": ["5"], "3.1.1": ["3.1.1"], "auto": ["5", "3.1.1"]}[protocol]
    probe_s = min(V5_PROBE_TIMEOUT_S, cfg.connect_timeout_s)
    return [
        Attempt(v, probe_s, probe=True)
        if v == "5" and len(order) > 1
        else Attempt(v, cfg.connect_timeout_s, probe=False)
        for v in order
    ]


def falls_back(attempt: Attempt, code: ReasonCode | None) -> bool:
    """Whether a refused v5 attempt should be followed by 3.1.1 (no answer, or "unsupported version")."""
    return attempt.probe and (code is None or code.value == UNSUPPORTED_PROTOCOL)


def refusal(cfg: BrokerConfig, code: ReasonCode | None) -> BusConnectError:
    """What a refused connect means, in words an operator can act on."""
    host, port, _ = cfg.endpoint()
    if code is None:
        return BusConnectError(f"broker {host}:{port} closed the connection before CONNACK")
    if code.value in NOT_AUTHORIZED:
        return BusConnectError(f"broker {host}:{port} refused the credentials ({code})")
    return BusConnectError(f"broker {host}:{port} refused the connection ({code})")


def connect_properties(
    cfg: BrokerConfig, version: str, *, persistent: bool, receive_maximum: int | None, max_packet_bytes: int | None
) -> Properties | None:
    """The v5 CONNECT's properties; None when there are none.

    (amqtt hangs on CONNECT properties: only the v5 probe, with its short timeout, may meet it.)
    """
    if version != "5" or not (persistent or receive_maximum or max_packet_bytes):
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        props.SessionExpiryInterval = cfg.session_expiry_s
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    if max_packet_bytes:  # the broker discards what is larger instead of sending it
        props.MaximumPacketSize = max_packet_bytes
    return props


def clean_start(version: str, *, persistent: bool) -> mqtt.CleanStartOption:
    """v5: a persistent session resumes; 3.1.1: paho's "clean on the first connect only"."""
    return not persistent if version == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY


async def open_until_answered(
    cfg: BrokerConfig, driver: Driver, connack: asyncio.Future[ReasonCode | None]
) -> ReasonCode | None:
    """Open the connection and return the CONNACK's reason (None: the broker closed it first).

    A refused TCP connect is retried (the broker may still be starting); a refused TLS certificate is not.
    """
    delay_s = RECONNECT_MIN_S / 4
    while True:
        try:
            await driver.open()
        except ssl.SSLCertVerificationError as exc:
            host, port, _ = cfg.endpoint()
            raise BusConnectError(f"broker {host}:{port}: TLS certificate refused ({exc.verify_message})") from None
        except OSError as exc:
            log.debug("bus.connect_retry", error=type(exc).__name__)
            await asyncio.sleep(delay_s)
            delay_s = min(2 * delay_s, RECONNECT_MIN_S)
            continue
        return await connack
