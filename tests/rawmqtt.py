"""Raw MQTT v5 packets, built byte by byte: what a hostile client can send that paho would never build.

Used by the packet screen's unit tests and by the packet fuzzer, which speaks to a real Mosquitto over a
plain socket (CONNECT, PUBLISH with any properties, PUBACK read back).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

PUBLISH, CONNECT, CONNACK, PUBACK, DISCONNECT = 0x30, 0x10, 0x20, 0x40, 0xE0
# MQTT 5 section 2.2.2.2: identifier -> value kind, for the properties a PUBLISH may carry.
PUBLISH_PROPERTIES = {
    0x01: "byte",  # Payload Format Indicator
    0x02: "int4",  # Message Expiry Interval
    0x03: "text",  # Content Type
    0x08: "text",  # Response Topic
    0x09: "binary",  # Correlation Data
    0x23: "int2",  # Topic Alias
    0x26: "pair",  # User Property
}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def prefixed(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


@dataclass(frozen=True)
class Prop:
    ident: int
    value: int | bytes | tuple[bytes, bytes]

    def encode(self) -> bytes:
        kind = PUBLISH_PROPERTIES[self.ident]
        head = bytes([self.ident])
        if kind == "byte":
            return head + bytes([int(self.value)])  # type: ignore[arg-type]
        if kind == "int2":
            return head + struct.pack("!H", self.value)
        if kind == "int4":
            return head + struct.pack("!I", self.value)
        if kind == "pair":
            name, value = self.value  # type: ignore[misc]
            return head + prefixed(name) + prefixed(value)
        return head + prefixed(self.value)  # type: ignore[arg-type]


def user_properties(count: int, size: int = 4) -> bytes:
    """`count` User Properties of `size`-byte names and values, encoded (fast: one repeated block)."""
    return Prop(0x26, (b"k" * size, b"v" * size)).encode() * count


def publish_body(topic: bytes, payload: bytes, props: bytes, qos: int = 1, mid: int = 1) -> bytes:
    """A PUBLISH's variable header and payload (what follows the fixed header)."""
    return prefixed(topic) + (struct.pack("!H", mid) if qos else b"") + varint(len(props)) + props + payload


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def publish(topic: bytes, payload: bytes, props: bytes = b"", qos: int = 1, mid: int = 1) -> bytes:
    return packet(PUBLISH | (qos << 1), publish_body(topic, payload, props, qos, mid))


def connect(client_id: bytes, keepalive_s: int = 60, username: bytes | None = None, password: bytes = b"") -> bytes:
    flags = 0x02 | (0xC0 if username is not None else 0)  # clean start, user name and password
    body = prefixed(b"MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive_s) + varint(0) + prefixed(client_id)
    if username is not None:
        body += prefixed(username) + prefixed(password)
    return packet(CONNECT, body)


class RawClient:
    """One MQTT v5 connection over a plain socket (clean start, no session)."""

    def __init__(
        self, port: int, client_id: str, timeout_s: float = 10.0, username: str | None = None, password: str = ""
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        user = username.encode() if username is not None else None
        self.sock.sendall(connect(client_id.encode(), username=user, password=password.encode()))
        kind, body = self.read()
        if kind != CONNACK or body[1] != 0:
            raise ConnectionError(f"CONNACK refused: {body!r}")
        self._mid = 0

    def _exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return bytes(data)

    def read(self) -> tuple[int, bytes]:
        first = self._exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first & 0xF0, self._exact(length)

    def publish(self, topic: bytes, payload: bytes, props: bytes = b"") -> int:
        """Send a QoS1 PUBLISH and wait for its PUBACK; returns the PUBACK's reason code."""
        self._mid = self._mid % 65535 + 1
        self.sock.sendall(publish(topic, payload, props, qos=1, mid=self._mid))
        while True:
            kind, body = self.read()
            if kind == PUBACK and struct.unpack("!H", body[:2])[0] == self._mid:
                return body[2] if len(body) > 2 else 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(packet(DISCONNECT, b"\x00"))
        self.sock.close()
