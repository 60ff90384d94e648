"""pahoio's pieces without a broker: the buffered socket, the cached correlation properties, the PUBACK fast
path, and the paho internals they lean on (an upgrade that moves them fails here, by name)."""

from __future__ import annotations

import socket

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker.transport import pahoclient
from worker.transport.pahoclient import CORRELATED_CACHE, LoopClient, correlated
from worker.transport.pahoio import Buffered


def test_the_paho_internals_we_override_or_read_still_exist():
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    for hook in ("_create_socket", "_handle_pubackcomp", "_handle_publish", "_easy_log", "_do_on_publish"):
        assert callable(getattr(mqtt.Client, hook, None)), hook
    for attr in ("_in_packet", "_out_messages", "_out_message_mutex", "_protocol"):
        assert hasattr(client, attr), attr


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(0)
    yield a, b
    a.close()
    b.close()


def test_sends_are_held_until_write_held_then_go_out_together(pair):
    a, b = pair
    sock = Buffered(a)
    assert sock.send(b"\x30\x02ab") == 4
    assert sock.send(b"\x40\x02\x00\x01") == 4
    b.settimeout(0)
    with pytest.raises(BlockingIOError):  # nothing reached the wire yet
        b.recv(100)
    assert sock.write_held()
    assert b.recv(100) == b"\x30\x02ab\x40\x02\x00\x01"


def test_small_reads_are_served_from_one_large_read(pair):
    a, b = pair
    sock = Buffered(a)
    b.sendall(b"\x40\x02\x00\x07\x40\x02\x00\x08")
    got = [sock.recv(1), sock.recv(1), sock.recv(2)]
    assert got == [b"\x40", b"\x02", b"\x00\x07"]
    assert sock.pending() == 4  # in our buffer: the selector cannot see it, so the driver reads on
    assert [sock.recv(1), sock.recv(1), sock.recv(5)] == [b"\x40", b"\x02", b"\x00\x08"]
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    b.close()
    assert sock.recv(1) == b""  # EOF reaches paho as the socket's would


def test_correlated_properties_pack_like_pahos_and_are_cached_within_bounds():
    plain = Properties(PacketTypes.PUBLISH)
    plain.CorrelationData = b"req-1"
    assert correlated(b"req-1").pack() == plain.pack()
    assert correlated(b"req-1") is correlated(b"req-1")
    for i in range(CORRELATED_CACHE + 5):
        correlated(str(i).encode())

    assert len(pahoclient._CORRELATED) <= CORRELATED_CACHE
    for i in range(20):
        correlated(bytes([i]) * 60_000)
    assert sum(2 * len(k) for k in pahoclient._CORRELATED) <= pahoclient.CORRELATED_CACHE_BYTES


def test_a_plain_puback_resolves_its_publish_without_pahos_decoder():
    acked = []
    client = LoopClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_publish = lambda _c, _u, mid, code, _p: acked.append((mid, code.is_failure))
    client._out_messages[7] = mqtt.MQTTMessage(7, b"t")
    client._out_messages[8] = mqtt.MQTTMessage(8, b"t")
    client._out_messages[9] = mqtt.MQTTMessage(9, b"t")
    client._out_messages[10] = mqtt.MQTTMessage(10, b"t")
    decoded = []
    client._in_packet["packet"] = bytearray(b"\x00\x07")  # the three plain forms
    assert client._handle_pubackcomp("PUBACK") == mqtt.MQTT_ERR_SUCCESS
    client._in_packet["packet"] = bytearray(b"\x00\x08\x00")
    client._handle_pubackcomp("PUBACK")
    client._in_packet["packet"] = bytearray(b"\x00\x09\x10\x00")  # "no matching subscribers" is a success
    client._handle_pubackcomp("PUBACK")
    client._in_packet["packet"] = bytearray(b"\x00\x0b")  # not ours: ignored, as paho does
    client._handle_pubackcomp("PUBACK")
    client.on_publish = lambda _c, _u, mid, code, _p: decoded.append((mid, code.is_failure))
    client._in_packet["packet"] = bytearray(b"\x00\x0a\x87")  # a refusal goes through paho's decoder
    client._handle_pubackcomp("PUBACK")
    assert acked == [(7, False), (8, False), (9, False)]
    assert decoded == [(10, True)]
