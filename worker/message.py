"""The transport-level message the bus hands to the service (bytes plus MQTT v5 properties), and MQTT's text rule."""

from __future__ import annotations

import re
from dataclasses import dataclass


def _forbidden_code_points() -> re.Pattern[str]:
    """What MQTT 5 section 1.5.4 forbids (or says to refuse) in a UTF-8 string, as one character class.

    NUL and surrogates are invalid outright (a lone surrogate cannot even be encoded); C0/C1 controls and
    the non-characters (U+FDD0-FDEF, U+xFFFE/xFFFF in every plane) make Mosquitto drop the connection of
    whoever sends them in a topic, the worker included.
    """
    planes = "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(0x11))
    return re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\ufdd0-\\ufdef{planes}]")


FORBIDDEN_CODE_POINTS = _forbidden_code_points()
SURROGATES = re.compile("[\\ud800-\\udfff]")


def is_mqtt_text(value: object) -> bool:
    """A string a broker accepts as MQTT 5 UTF-8 text (section 1.5.4): the one check for every topic we publish to."""
    return isinstance(value, str) and FORBIDDEN_CODE_POINTS.search(value) is None


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
    violation: str | None = None
    """A packet-level bound the message broke (its MQTT v5 properties); the request is refused with it."""
