import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ErrorCode
from worker.message import InboundMessage
from worker.protocol import KNOWN_FIELDS, Dialect, Rejected, Request, Topics, parse, strip_reasoning

TOPICS = Topics()
MAX = 256 * 1024


def _parse(payload, topic="maze/user_input", projects=None, **props):
    data = (
        payload
        if isinstance(payload, bytes)
        else (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
    )
    return parse(InboundMessage(topic, data, **props), projects, TOPICS, MAX)


@pytest.fixture
def p(projects):
    return lambda payload, topic="maze/user_input", **props: _parse(payload, topic, projects, **props)


def rejected(p, payload, topic="maze/user_input", **props) -> Rejected:
    with pytest.raises(Rejected) as info:
        p(payload, topic, **props)
    return info.value


def test_plain_text_is_the_message_with_default_session(p):
    req = p("Which way is out?")
    assert req.message == "Which way is out?"
    assert req.route.session_id == "default"
    assert req.route.dialect is Dialect.CLASSIC
    assert req.route.topic == "maze/assistant_response/default"


def test_json_message_and_session(p):
    req = p({"message": "hi", "sessionId": "robot-7"})
    assert req.message == "hi"
    assert req.route.topic == "maze/assistant_response/robot-7"


def test_json_string_payload_is_plain_text(p):
    assert p('"quoted"').message == '"quoted"'


def test_session_in_topic(p):
    req = p({"message": "hi"}, "maze/user_input/s9")
    assert req.route.topic == "maze/assistant_response/s9"


def test_session_in_topic_must_match_payload(p):
    err = rejected(p, {"message": "hi", "sessionId": "other"}, "maze/user_input/s9")
    assert err.error.code is ErrorCode.BAD_REQUEST
    assert err.route is not None
    assert err.route.topic == "maze/assistant_response/s9"  # the topic the sender listens on


def test_text_that_merely_starts_with_a_brace_is_the_message(p):
    req = p("{Wall ahead} opening left. Which way?")  # PROTOCOL 1: not a JSON object -> the text itself
    assert req.message == "{Wall ahead} opening left. Which way?"
    assert req.route.topic == "maze/assistant_response/default"


def test_invalid_utf8_is_bad_request(p):
    err = rejected(p, b"\xff\xfe{")
    assert err.error.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "nul\x00", "x" * 129, "", "spa ce", 7])
def test_bad_session_ids_are_rejected_without_a_route(p, bad):
    err = rejected(p, {"message": "hi", "sessionId": bad})
    assert err.error.code is ErrorCode.BAD_REQUEST
    assert err.route is None  # never spliced into a topic


@pytest.mark.parametrize("field", ["requestId", "clientId"])
def test_bad_other_ids_are_rejected_on_a_safe_route(p, field):
    err = rejected(p, {"message": "hi", "sessionId": "s1", field: "a/#"})
    assert err.error.code is ErrorCode.BAD_REQUEST
    assert err.route is not None
    assert "#" not in err.route.topic


def test_oversized_payload_is_too_large(p):
    err = rejected(p, {"message": "x" * (MAX + 10)})
    assert err.error.code is ErrorCode.TOO_LARGE
    assert err.route is not None


def test_oversized_v2_payload_still_gets_a_v2_route(p):
    err = rejected(p, {"v": 2, "clientId": "c1", "message": "x" * (MAX + 10)})
    assert err.error.code is ErrorCode.TOO_LARGE
    assert err.route is not None
    assert err.route.topic == "maze/response/c1"


def test_message_over_project_limit_is_too_large(p, projects):
    limit = projects["maze"].limits.max_message_chars
    assert rejected(p, {"message": "x" * (limit + 1)}).error.code is ErrorCode.TOO_LARGE


def test_unknown_project(p):
    err = rejected(p, "hi", "nosuch/user_input")
    assert err.error.code is ErrorCode.UNKNOWN_PROJECT
    assert err.route is not None
    assert err.route.topic == "nosuch/assistant_response/default"


def test_empty_message_is_bad_request(p):
    assert rejected(p, {"message": "  "}).error.code is ErrorCode.BAD_REQUEST


def test_v2_dialect_and_reply_topic(p):
    req = p({"v": 2, "message": "hi", "clientId": "c1", "requestId": "r-1"})
    assert req.route.dialect is Dialect.V2
    assert req.route.topic == "maze/response/c1"
    assert req.request_id == "r-1"
    assert req.client_supplied_id


def test_v5_response_topic_selects_v2_and_keeps_correlation(p):
    req = p({"message": "hi"}, response_topic="maze/response/app-1", correlation_data=b"\x01\x02")
    assert req.route.dialect is Dialect.V2
    assert req.route.topic == "maze/response/app-1"
    assert req.route.correlation_data == b"\x01\x02"


def test_v5_expiry_becomes_deadline(p):
    assert p({"message": "hi", "deadlineMs": 90_000}, expiry_s=30).deadline_ms == 30_000


@pytest.mark.parametrize(
    ("reply_topic", "ok"),
    [
        ("maze/assistant_response/custom", True),
        ("maze/assistant_response/", False),
        ("maze/assistant_response/+", False),
        ("maze/assistant_response/#", False),
        ("driving/assistant_response/x", False),
        ("$SYS/x", False),
        ("other/topic", False),
    ],
)
def test_reply_topic_must_stay_under_the_dialect_prefix(p, reply_topic, ok):
    payload = {"message": "hi", "replyTopic": reply_topic}
    if ok:
        assert p(payload).route.topic == reply_topic
    else:
        err = rejected(p, payload)
        assert err.error.code is ErrorCode.BAD_REQUEST
        assert err.route is not None
        assert err.route.topic == "maze/assistant_response/default"


def test_greedy_temperature_zero_stays_zero(p):
    assert p({"message": "hi", "temperature": 0}).sampling.temperature == 0.0


def test_sampling_is_clamped_to_project_limits(p, projects):
    lim = projects["maze"].limits
    s = p({"message": "hi", "temperature": 99, "maxTokens": 10**6}).sampling
    assert s.temperature == lim.max_temperature
    assert s.max_tokens == lim.max_tokens


def test_project_defaults_apply(p, projects):
    d = projects["maze"].defaults
    s = p({"message": "hi"}).sampling
    assert (s.temperature, s.top_p, s.max_tokens) == (d.temperature, d.top_p, d.max_tokens)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": "hot"},
        {"temperature": -1},
        {"temperature": True},
        {"topP": 0},
        {"topP": 1.5},
        {"maxTokens": 0},
        {"maxTokens": 1.5},
        {"stop": [1]},
        {"stop": ["a"] * 100},
        {"seed": "x"},
        {"stream": "yes"},
        {"deadlineMs": 0},
        {"v": 3},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"systemPrompt": 5},
        {"jsonSchema": {"type": "object", "properties": 5}},
        {"jsonSchema": "not an object"},
    ],
)
def test_invalid_fields_are_bad_request(p, fields):
    payload = {"message": "hi", **fields}
    if "messages" in fields:
        del payload["message"]
    assert rejected(p, payload).error.code is ErrorCode.BAD_REQUEST


def test_messages_are_stateless_chat(p):
    req = p(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        }
    )
    assert req.message is None
    assert req.messages is not None
    assert [m.content for m in req.messages] == ["a", "b", "c"]


def test_unknown_fields_are_reported(p):
    assert p({"message": "hi", "colour": "blue"}).unknown_fields == ("colour",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<think>hmm</think>The answer.", "The answer."),
        ("reasoning only</think> Answer", "Answer"),
        ("Start <think>a</think> mid <think>b</think> end", "Start  mid  end"),
        ("<think>cut off by max_tokens", ""),
        ("No reasoning.", "No reasoning."),
    ],
)
def test_strip_reasoning(raw, expected):
    assert strip_reasoning(raw) == expected


def outcome_of(payload: bytes, projects) -> Request | Rejected:
    """parse() must return a Request or raise Rejected; anything else escapes and fails the test."""
    try:
        return _parse(payload, "maze/user_input", projects)
    except Rejected as r:
        return r


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_any_bytes_give_a_request_or_a_typed_rejection(projects, payload):
    outcome = outcome_of(payload, projects)
    assert isinstance(outcome, Request) or outcome.error.code in set(ErrorCode)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(sorted(KNOWN_FIELDS | {"other"}))  # every wire field, plus an unknown one


@settings(max_examples=1000, deadline=None)
@given(body=st.dictionaries(field_names, json_values, max_size=6))
def test_any_json_object_gives_a_request_or_a_typed_rejection(projects, body):
    outcome = outcome_of(json.dumps(body).encode(), projects)
    if isinstance(outcome, Request):
        assert outcome.message or outcome.messages
    else:
        assert outcome.error.code in set(ErrorCode)
        if outcome.route is not None:
            assert "+" not in outcome.route.topic
            assert "#" not in outcome.route.topic
