"""The PUBLISH property screen: bounded work and bounded bytes whatever the properties, never an exception.

Generated property sections (every PUBLISH property type, extreme counts and sizes, random bytes) go
through `screen_publish`; whatever it returns must decode with paho's own decoder, keep the payload, and
say why when it dropped anything.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from rawmqtt import PUBLISH, Prop, publish_body, user_properties

from worker.transport.packets import (
    MAX_CORRELATION_BYTES,
    MAX_PROPERTIES,
    MAX_USER_PROPERTY_BYTES,
    screen_publish,
)

TOPIC = b"maze/user_input"
PAYLOAD = b'{"v":2,"clientId":"c","message":"hi"}'
HEADER = PUBLISH | 0x02  # QoS 1


def decode(body: bytes | bytearray):
    return _packet.decode_publish(HEADER, bytearray(body), MQTTProtocolVersion.MQTTv5)


def props_strategy() -> st.SearchStrategy[bytes]:
    small = st.binary(max_size=64)
    prop = st.one_of(
        st.builds(Prop, st.just(0x01), st.integers(0, 1)),
        st.builds(Prop, st.just(0x02), st.integers(0, 2**32 - 1)),
        st.builds(Prop, st.just(0x03), st.text(max_size=40).map(str.encode)),
        st.builds(
            Prop, st.just(0x08), st.sampled_from([b"maze/response/a", b"x" * 3000, "maze/response/\u00e9".encode()])
        ),
        st.builds(Prop, st.just(0x09), st.one_of(small, st.binary(min_size=MAX_CORRELATION_BYTES, max_size=4096))),
        st.builds(Prop, st.just(0x26), st.tuples(small, small)),
    )
    listed = st.lists(prop, max_size=MAX_PROPERTIES + 20).map(lambda ps: b"".join(p.encode() for p in ps))
    flood = st.integers(0, 50_000).map(user_properties)
    return st.one_of(listed, flood, st.binary(max_size=200))


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(props_strategy())
def test_every_property_section_screens_to_a_packet_paho_decodes_with_the_payload_intact(props):
    body = publish_body(TOPIC, PAYLOAD, props)
    screened = screen_publish(HEADER, bytearray(body))
    if screened.violation is None:
        assert screened.packet == body  # within bounds: untouched
    else:
        result = decode(screened.packet)  # what paho decodes after us: a handful of properties at most
        assert result.payload == PAYLOAD
        assert result.topic == TOPIC
        kept = result.properties.json()
        assert set(kept) <= {"ResponseTopic", "MessageExpiryInterval"}
        assert len(screened.packet) <= len(body)


def test_a_flood_of_user_properties_is_cut_after_a_bounded_number_of_steps():
    props = user_properties(120_000)  # the 2 x 0.9 MiB case: ~90 s in paho's decoder
    body = bytearray(publish_body(TOPIC, PAYLOAD, props))
    started = time.process_time()
    screened = screen_publish(HEADER, body)
    spent_s = time.process_time() - started
    assert screened.violation == f"more than {MAX_PROPERTIES} MQTT properties"
    assert decode(screened.packet).payload == PAYLOAD
    print(f"screened {len(body)} bytes of properties in {spent_s * 1000:.1f} ms CPU")  # reported, not asserted


def test_named_bounds_each_refuse_with_their_reason():
    big_user = Prop(0x26, (b"n" * 5000, b"v" * 5000)).encode()
    assert f"{MAX_USER_PROPERTY_BYTES} bytes" in str(
        screen_publish(HEADER, bytearray(publish_body(TOPIC, PAYLOAD, big_user))).violation
    )
    corr = Prop(0x09, b"c" * (MAX_CORRELATION_BYTES + 1)).encode()
    assert "Correlation Data" in str(screen_publish(HEADER, bytearray(publish_body(TOPIC, PAYLOAD, corr))).violation)
    ok = Prop(0x09, b"c" * MAX_CORRELATION_BYTES).encode() + Prop(0x08, b"maze/response/x").encode()
    assert screen_publish(HEADER, bytearray(publish_body(TOPIC, PAYLOAD, ok))).violation is None


def test_the_response_topic_seen_before_the_bound_survives_for_the_error_reply():
    props = Prop(0x08, b"maze/response/app").encode() + Prop(0x02, 30).encode() + user_properties(MAX_PROPERTIES)
    screened = screen_publish(HEADER, bytearray(publish_body(TOPIC, PAYLOAD, props)))
    assert screened.violation is not None
    kept = decode(screened.packet).properties
    assert kept.ResponseTopic == "maze/response/app"
    assert kept.MessageExpiryInterval == 30


def test_malformed_sections_never_raise():
    for props in (b"\x26\xff\xff", b"\x99\x00", b"\x0b\xff\xff\xff\xff\xff", b"\x09\x00\x05ab"):
        screened = screen_publish(HEADER, bytearray(publish_body(TOPIC, PAYLOAD, props)))
        assert screened.violation is not None
        assert decode(screened.packet).payload == PAYLOAD
