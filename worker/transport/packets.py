"""A bounded, linear look at an inbound MQTT v5 PUBLISH's properties, before paho's decoder sees them.

paho's `Properties.unpack` slices the remaining buffer once per property: quadratic in their number. A
0.9 MiB PUBLISH of 60,000 User Properties held the event loop for 19 s (120,000: ~90 s, SIGTERM
ignored, the broker dropping the worker on keepalive and redelivering the packet to it). Here at most
`MAX_PROPERTIES` properties are walked with offsets; a packet over any bound is rewritten to keep only
what routing needs (Response Topic, Message Expiry) and carries the violation, so the request is
answered `too_large` instead of being decoded. Bounds on what is kept per request in bytes
(Correlation Data is copied into every reply and cached with the final one) are checked here too.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PROPERTIES = 64
"""Properties of one PUBLISH (User Properties included) that are looked at; more is a violation."""
MAX_CORRELATION_BYTES = 1024
"""Correlation Data: copied into every reply of the request and kept with its cached final reply."""
MAX_USER_PROPERTY_BYTES = 8192
"""All User Properties' names and values together (the worker reads none of them)."""
MAX_STRING_PROPERTY_BYTES = 2048
"""Response Topic, Content Type (a reply topic is at most 512 characters)."""
PACKET_OVERHEAD_BYTES = 64 * 1024
"""Topic and properties on top of a payload: Maximum Packet Size = the routing-parse limit + this."""

_BYTE, _INT2, _INT4, _VARINT, _TEXT, _BINARY, _PAIR = range(7)
# MQTT 5 section 2.2.2.2, the properties a PUBLISH may carry.
_KIND = {0x01: _BYTE, 0x02: _INT4, 0x03: _TEXT, 0x08: _TEXT, 0x09: _BINARY, 0x0B: _VARINT, 0x23: _INT2, 0x26: _PAIR}
_FIXED = {_BYTE: 1, _INT2: 2, _INT4: 4}
_EXPIRY, _RESPONSE_TOPIC, _CORRELATION, _USER = 0x02, 0x08, 0x09, 0x26
_KEPT_ON_VIOLATION = (_EXPIRY, _RESPONSE_TOPIC)


class _MalformedError(ValueError):
    """The property section does not parse (a broker should never forward such a packet)."""


@dataclass(frozen=True, slots=True)
class Screened:
    """The PUBLISH body to decode (the original when nothing was over a bound) and the violation, if any."""

    packet: bytearray
    violation: str | None = None


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(value, next position) of a Variable Byte Integer (at most 4 bytes)."""
    value = 0
    for shift in range(0, 28, 7):
        if pos >= len(buf):
            raise _MalformedError("truncated variable byte integer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise _MalformedError("variable byte integer over 4 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_prefixed(buf: bytes | bytearray, pos: int, end: int) -> int:
    """Position after a two-byte-length-prefixed string or binary starting at `pos`."""
    if pos + 2 > end:
        raise _MalformedError("truncated length")
    after = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
    if after > end:
        raise _MalformedError("truncated string")
    return after


def _skip(buf: bytes | bytearray, pos: int, end: int, kind: int) -> int:
    """Position after one property value of `kind` starting at `pos`."""
    if kind in _FIXED:
        pos += _FIXED[kind]
    elif kind == _VARINT:
        _, pos = _varint(buf, pos)
    else:
        pos = _length_prefixed(buf, pos, end)
        if kind == _PAIR:
            pos = _length_prefixed(buf, pos, end)
    if pos > end:
        raise _MalformedError("truncated property")
    return pos


def _over_bound(ident: int, kind: int, size: int, user_bytes: int) -> str | None:
    """The bound one property breaks (`size`: its bytes; `user_bytes`: all User Properties' so far)."""
    if ident == _USER and user_bytes > MAX_USER_PROPERTY_BYTES:
        return f"MQTT User Properties over {MAX_USER_PROPERTY_BYTES} bytes"
    if ident == _CORRELATION and size - 3 > MAX_CORRELATION_BYTES:
        return f"Correlation Data over {MAX_CORRELATION_BYTES} bytes"
    if kind == _TEXT and size - 3 > MAX_STRING_PROPERTY_BYTES:
        return f"an MQTT string property over {MAX_STRING_PROPERTY_BYTES} bytes"
    return None


def _walk(buf: bytes | bytearray, start: int, end: int) -> tuple[dict[int, tuple[int, int]], str | None]:
    """Spans of the properties kept on a violation, and the first bound broken (None: within bounds)."""
    kept: dict[int, tuple[int, int]] = {}
    user_bytes = count = 0
    pos = start
    while pos < end:
        count += 1
        if count > MAX_PROPERTIES:
            return kept, f"more than {MAX_PROPERTIES} MQTT properties"
        ident, begin = buf[pos], pos
        kind = _KIND.get(ident)
        if kind is None:
            raise _MalformedError(f"property 0x{ident:02x} is not allowed in PUBLISH")
        pos = _skip(buf, pos + 1, end, kind)
        if ident == _USER:
            user_bytes += pos - begin
        if (violation := _over_bound(ident, kind, pos - begin, user_bytes)) is not None:
            return kept, violation
        if ident in _KEPT_ON_VIOLATION:
            kept[ident] = (begin, pos)
    return kept, None


def _properties_span(header: int, packet: bytes | bytearray) -> tuple[int, int, int]:
    """(where the property length starts, where the properties start, where they end) in a PUBLISH body."""
    qos = (header & 0x06) >> 1
    pos = _length_prefixed(packet, 0, len(packet)) + (2 if qos else 0)
    props_len, props_start = _varint(packet, pos)
    if props_start + props_len > len(packet):
        raise _MalformedError("property length beyond the packet")
    return pos, props_start, props_start + props_len


def screen_publish(header: int, packet: bytearray) -> Screened:
    """Check a v5 PUBLISH body (after the fixed header) against the bounds above; never raises.

    Within bounds the packet is returned as it is. Over a bound (or malformed) it is rebuilt with only the
    Response Topic and Message Expiry seen before the bound broke: the work done is O(MAX_PROPERTIES)
    property steps plus one copy of the payload, whatever the packet holds.
    """
    try:
        pos, props_start, props_end = _properties_span(header, packet)
    except _MalformedError:
        return Screened(packet)  # the topic or packet id itself is broken: paho's decoder reports it
    try:
        kept, violation = _walk(packet, props_start, props_end)
    except _MalformedError as exc:
        kept, violation = {}, f"malformed MQTT properties ({exc})"
    if violation is None:
        return Screened(packet)
    props = b"".join(bytes(packet[a:b]) for a, b in kept.values())
    rebuilt = bytearray(packet[:pos])
    rebuilt += _encode_varint(len(props)) + props
    rebuilt += memoryview(packet)[props_end:]
    return Screened(rebuilt, violation)
