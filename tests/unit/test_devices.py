"""What devices send is hostile input: announcements and results of any shape, in floods."""

import json
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.message import InboundMessage
from worker.projects import Project, ProjectTool
from worker.protocol import Topics
from worker.serving.devices import MAX_DEVICE_TOOLS, MAX_DEVICES, DeviceTools

LAB = Project(
    name="lab",
    system_prompt="x",
    capabilities=True,
    tools=(ProjectTool(name="move", topic="lab/tools/robot/move"),),
)
OTHER = Project(name="other", system_prompt="x")


async def _never(*_args) -> None:
    raise AssertionError("no call is made here")


def devices() -> tuple[DeviceTools, Counter]:
    counters: Counter = Counter()
    return DeviceTools({"lab": LAB, "other": OTHER}, Topics(), "w1", _never, counters), counters


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
tool_shaped = st.fixed_dictionaries(
    {"name": st.text(max_size=70) | json_values},
    optional={"description": json_values, "parameters": json_values, "timeoutMs": json_values},
)
payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.lists(tool_shaped, max_size=20).map(lambda t: json.dumps({"tools": t}).encode())
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.text(max_size=20), payloads), max_size=8))
def test_any_announcement_is_taken_or_refused_never_raised(messages):
    d, _ = devices()
    for device, payload in messages:
        assert d.take(InboundMessage(f"lab/capabilities/{device}", payload, retain=True)) is True
    tools = d.tools("lab")
    assert tools[0].spec.name == "move"  # declared tools are never shadowed
    assert len({t.spec.name for t in tools}) == len(tools)
    for tool in tools[1:]:
        assert d._topics.is_tool_topic("lab", tool.topic)


@settings(max_examples=200)
@given(payloads, st.binary(max_size=40) | st.none())
def test_any_result_is_dropped_and_counted_when_nobody_waits(payload, correlation):
    d, counters = devices()
    assert d.take(InboundMessage("lab/worker/w1/tool_result", payload, correlation_data=correlation)) is True
    assert counters[("lab", "tool_results_dropped")] == 1
    assert d.pending() == 0


def test_a_flood_of_announcers_keeps_at_most_the_bound():
    d, counters = devices()
    tool = {"name": "beep", "parameters": {"type": "object"}}
    for i in range(MAX_DEVICES + 300):
        d.take(InboundMessage(f"lab/capabilities/dev-{i}", json.dumps({"tools": [tool]}).encode(), retain=True))
    assert len(d._announced["lab"]) == MAX_DEVICES
    assert counters[("lab", "capabilities_refused")] == 300
    big = {"tools": [tool | {"name": f"t{i}"} for i in range(MAX_DEVICE_TOOLS + 1)]}
    d.take(InboundMessage("lab/capabilities/dev-0", json.dumps(big).encode(), retain=True))
    assert counters[("lab", "capabilities_refused")] == 301
    d.take(InboundMessage("lab/capabilities/dev-0", b"", retain=True))  # an empty retained message removes
    assert len(d._announced["lab"]) == MAX_DEVICES - 1


def test_a_project_without_capabilities_takes_no_announcement_and_no_results():
    d, _ = devices()
    assert d.take(InboundMessage("other/capabilities/x", b'{"tools": []}', retain=True)) is False
    assert d.take(InboundMessage("other/worker/w1/tool_result", b"{}")) is False
    assert d.filters() == ["lab/worker/w1/tool_result", "lab/capabilities/+"]
