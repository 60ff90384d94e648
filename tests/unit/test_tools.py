"""Tools as a class of hostile input, and the pieces of a tool round (ids, argument checks, history units)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine.chat_templates import CHATML_TOOLS, tool_format
from worker.errors import ErrorCode
from worker.message import InboundMessage
from worker.projects import load_projects
from worker.protocol import Rejected, Request, Topics, parse
from worker.protocol.tools import ToolCall, ToolResult, ToolSpec, call_id, check_arguments
from worker.state.base import Turn
from worker.state.codec import decode_turn, encode_turn
from worker.state.memory import trim

PROJECTS = load_projects("topics", ["maze"])
SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
tool_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "other", 1])},
    optional={
        "function": st.fixed_dictionaries(
            {}, optional={"name": st.text(max_size=70) | json_values, "parameters": json_values}
        )
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    tools=st.none() | st.lists(tool_like, max_size=4) | json_values,
    choice=st.none() | st.sampled_from(["auto", "none", "required", "bogus"]) | json_values,
    results=st.none() | st.lists(st.fixed_dictionaries({"toolCallId": json_values, "content": json_values})),
    v=st.sampled_from([1, 2]),
)
def test_any_tool_fields_parse_to_a_request_or_a_typed_refusal(tools, choice, results, v):
    body = {"v": v, "message": "hi", "sessionId": "s", "tools": tools, "toolChoice": choice, "toolResults": results}
    outcome = _outcome(body)
    if isinstance(outcome, Rejected):
        assert outcome.error.code in {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE}
        assert not outcome.internal, "a bug of ours refused it, not the payload"
        return
    request = outcome
    offered = tools is not None or choice is not None or results is not None
    assert not offered or v == 2  # a classic request never gets tools
    if request.tools is not None:
        assert all(spec.name for spec in request.tools.specs)


def _outcome(body: dict) -> Request | Rejected:
    try:
        return parse(InboundMessage("maze/user_input", json.dumps(body).encode()), PROJECTS, Topics(), 1 << 18)
    except Rejected as refused:
        return refused


def test_call_ids_are_derived_from_the_request_round_and_index():
    assert call_id("r1", 0, 0) == call_id("r1", 0, 0)
    assert len({call_id("r1", 0, 0), call_id("r1", 0, 1), call_id("r1", 1, 0), call_id("r2", 0, 0)}) == 4
    assert call_id("x" * 128, 3, 15).startswith("call-")


@pytest.mark.parametrize(
    ("spec", "arguments", "error"),
    [
        (ToolSpec("f", parameters=SCHEMA), '{"n": 1}', None),
        (ToolSpec("f", parameters=SCHEMA), '{"n": "1"}', "do not match the schema"),
        (ToolSpec("f", parameters=SCHEMA), "[1]", "not a JSON object"),
        (ToolSpec("f", parameters=SCHEMA), "{", "not a JSON object"),
        (ToolSpec("f"), "{}", None),
        (None, "{}", "unknown tool"),
        (ToolSpec("f"), '{"a": "' + "x" * 20_000 + '"}', "over"),
    ],
)
def test_arguments_are_checked_before_anyone_acts(spec, arguments, error):
    problem = check_arguments(spec, "f", arguments)
    assert (problem is None) if error is None else (error in (problem or ""))


CALL = ToolCall("c1", "look", "{}")


def test_history_trims_a_tool_round_as_one_unit():
    turns = (
        Turn("old", "a", 5),
        Turn("look", "", 5, tool_calls=(CALL,)),
        Turn("", "a door", 5, tool_results=(ToolResult("c1", "door"),)),
        Turn("new", "b", 5),
    )
    assert trim(turns, 20) == turns
    assert trim(turns, 15) == turns[1:]
    assert trim(turns, 10) == turns[3:]  # never the results without their call
    assert trim(turns[2:], 100) == turns[3:]  # an orphaned continuation is dropped


def test_tool_turns_survive_the_redis_codec_and_bad_ones_are_skipped():
    turn = Turn("look", "", 7, "r1", (CALL,), (ToolResult("c0", "prev"),))
    assert decode_turn(encode_turn(turn).encode()) == turn
    assert decode_turn(encode_turn(Turn("q", "a", 2)).encode()) == Turn("q", "a", 2)
    for bad in ['{"calls": [[1, 2, 3]]}', '{"calls": [["a", "b"]]}', '{"results": "x"}', "[]"]:
        assert decode_turn(f'3\n["q", "a", null, {bad}]'.encode()) is None


def test_tool_format_auto_reads_the_template():
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"
    assert tool_format(chatml, None, "auto").parser == "hermes"
    assert tool_format(chatml, None, "auto").template == CHATML_TOOLS.read_text(encoding="utf-8")
    assert tool_format("{{ tools }} <tool_call>", None, "auto") == tool_format("x<tool_call>", None, "auto")
    assert tool_format("[INST] {{ m }}", None, "auto").parser is None
    assert tool_format(chatml, None, "llama3_json").parser == "llama3_json"
    assert tool_format(chatml, None, None).parser is None
