"""The transport-level message the bus hands to the service: bytes plus MQTT v5 properties."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message as received; `mid`/`qos` identify it for the manual PUBACK."""

    topic: str
    payload: bytes
    qos: int = 1
    mid: int = 0
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None
    retain: bool = False
    """Set when the broker replays a stored (retained) message on subscribe, not for live ones."""
