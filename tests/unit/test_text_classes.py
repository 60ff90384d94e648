"""Strings that become topics, stored state or engine input, as classes: the whole Unicode range.

A reply topic holding one C0/C1 control, a non-character or a lone surrogate got the worker dropped by
Mosquitto (a permanent reconnect loop) or an unencodable publish (a job with no final reply, its
message never acked); a lone surrogate in a text field reached the engine and Redis and came back as
`engine_error`. Now: every accepted route publishes to valid MQTT text, and every lone surrogate in any
string of a request is `bad_request` at parse time, answered on the sender's own route.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ErrorCode
from worker.message import InboundMessage, is_mqtt_text
from worker.protocol import Dialect, Rejected, Topics, is_safe_topic, parse

TOPICS = Topics()
MAX = 256 * 1024
FORBIDDEN = [
    *map(chr, range(0x20)),
    *map(chr, range(0x7F, 0xA0)),
    *map(chr, range(0xFDD0, 0xFDF0)),
    *(chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF)),
    "\ud800",
    "\udbff",
    "\udc80",
    "\udfff",
]
anything = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40)  # surrogates included


def _parse(projects, body, **props):
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \udc80 escapes, as attackers send them
    return parse(InboundMessage("maze/user_input", raw, **props), projects, TOPICS, MAX)


def outcome(projects, body, **props):
    try:
        return _parse(projects, body, **props).route
    except Rejected as rejected:
        return rejected


@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_every_forbidden_code_point_in_a_reply_topic_is_bad_request_on_the_senders_route(projects, char):
    for body, props in (
        ({"v": 2, "clientId": "x", "requestId": "r1", "message": "hi", "replyTopic": f"maze/response/a{char}b"}, {}),
        ({"message": "hi", "sessionId": "s", "replyTopic": f"maze/assistant_response/a{char}"}, {}),
        ({"v": 2, "clientId": "x", "message": "hi"}, {"response_topic": f"maze/response/{char}"}),
    ):
        got = outcome(projects, body, **props)
        assert isinstance(got, Rejected), (char, body)
        assert got.error.code is ErrorCode.BAD_REQUEST
        assert got.route is not None
        assert is_mqtt_text(got.route.topic)
        assert got.route.topic in ("maze/response/x", "maze/assistant_response/s")


@settings(max_examples=400, derandomize=True)
@given(suffix=anything, dialect=st.sampled_from(["v2", "classic", "v5"]))
def test_any_accepted_reply_topic_is_mqtt_text_and_encodes(projects, suffix, dialect):
    if dialect == "v5":
        got = outcome(projects, {"v": 2, "clientId": "x", "message": "hi"}, response_topic=f"maze/response/{suffix}")
    else:
        prefix = "maze/response/" if dialect == "v2" else "maze/assistant_response/"
        body = {"clientId": "x", "message": "hi", "replyTopic": prefix + suffix}
        if dialect == "v2":
            body["v"] = 2
        got = outcome(projects, body)
    route = got.route if isinstance(got, Rejected) else got
    assert route is not None
    assert is_safe_topic(route.topic)
    route.topic.encode("utf-8")  # never raises: what the bus will publish to
    if isinstance(got, Rejected):
        assert got.error.code is ErrorCode.BAD_REQUEST


TEXT_FIELDS = [
    ("message", lambda s: s),
    ("systemPrompt", lambda s: s),
    ("stop", lambda s: [s]),
    ("messages", lambda s: [{"role": "user", "content": s}]),
    ("unknownField", lambda s: s),
    ("jsonSchema", lambda s: {"type": "object", "description": s}),
]


@pytest.mark.parametrize(("field", "shape"), TEXT_FIELDS, ids=[f for f, _ in TEXT_FIELDS])
@settings(max_examples=40, derandomize=True)
@given(
    before=st.text(max_size=8),
    surrogate=st.integers(0xD800, 0xDFFF).map(chr),
    after=st.text(max_size=8),
    v2=st.booleans(),
)
def test_a_lone_surrogate_in_any_text_field_is_bad_request_at_parse_time(
    projects, field, shape, before, surrogate, after, v2
):
    body = {"clientId": "c1", "sessionId": "s1", "requestId": "r1", "message": "hi"}
    if field == "messages":
        del body["message"]
    if v2:
        body["v"] = 2
    body[field] = shape(before + surrogate + after)
    got = outcome(projects, body)
    assert isinstance(got, Rejected)
    assert got.error.code is ErrorCode.BAD_REQUEST
    assert "surrogate" in got.error.message
    assert got.route is not None
    assert got.route.dialect is (Dialect.V2 if v2 else Dialect.CLASSIC)


def test_a_lone_surrogate_in_a_key_is_bad_request(projects):
    got = outcome(projects, {"v": 2, "clientId": "c1", "message": "hi", "x\udc80": 1})
    assert isinstance(got, Rejected)
    assert got.error.code is ErrorCode.BAD_REQUEST


def test_paired_surrogate_escapes_are_ordinary_text(projects):
    raw = b'{"v":2,"clientId":"c1","message":"hi \\ud83d\\ude00"}'
    req = parse(InboundMessage("maze/user_input", raw), projects, TOPICS, MAX)
    assert req.message == "hi \U0001f600"


def test_a_packet_violation_is_too_large_on_the_payloads_route(projects):
    got = outcome(projects, {"v": 2, "clientId": "c1", "message": "hi"}, violation="more than 64 MQTT properties")
    assert isinstance(got, Rejected)
    assert got.error.code is ErrorCode.TOO_LARGE
    assert got.route is not None
    assert got.route.topic == "maze/response/c1"
