"""Client tools (docs/protocol.md section 3a) with the fake engine: real Mosquitto (v5) and amqtt (3.1.1).

The fake's calls are scripted by the user's message (`call:NAME` or `call:NAME:JSON`), so each test
decides what the model "does"; the worker's part (ids, argument checks, the session's tool rounds,
stream events, the final reply) is what is under test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from support import Mosquitto, peer, running_worker

from worker.client import Client
from worker.config import BrokerConfig
from worker.protocol.tools import call_id

MOVE = {
    "type": "function",
    "function": {
        "name": "move",
        "description": "Move the robot one cell.",
        "parameters": {
            "type": "object",
            "properties": {"direction": {"type": "string", "enum": ["north", "south", "east", "west"]}},
            "required": ["direction"],
        },
    },
}
LOOK = {"type": "function", "function": {"name": "look", "description": "What the robot sees."}}


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(params=["mosquitto-v5", "amqtt-3.1.1"])
async def worker_port(request):
    if request.param == "amqtt-3.1.1":
        async with running_worker() as w:
            yield w.port
        return
    mosq = Mosquitto().start()
    try:
        async with running_worker(broker_url=mosq.url) as w:
            yield w.port
    finally:
        mosq.stop()


def client(port: int, client_id: str = "robot-app") -> Client:
    return Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=client_id)


async def test_a_client_tool_round_trip_records_the_call_and_its_result(worker_port):
    ran: list[tuple[str, dict]] = []

    def robot(name, arguments):
        ran.append((name, arguments))
        return f"moved {arguments['direction']}"

    async with client(worker_port) as c:
        reply = await c.ask(
            "maze", 'call:move:{"direction":"north"}', session="s1", request_id="r1", tools=[MOVE], on_tool=robot
        )
    assert ran == [("move", {"direction": "north"})]
    assert reply.ok, reply.raw
    assert reply.finish_reason == "stop"
    assert reply.text == "results: moved north"  # the fake answers with the tool results it was given
    (first,) = reply.previous
    assert first.finish_reason == "tool_calls"
    assert first.tool_calls == [{"id": call_id("r1", 0, 0), "name": "move", "arguments": {"direction": "north"}}]


async def test_a_session_holds_the_tool_round_for_later_turns(worker_port):
    async with client(worker_port) as c:
        await c.ask("maze", "call:look", session="s2", tools=[LOOK], on_tool=lambda _n, _a: "a wall")
        later = await c.ask("maze", "and now?", session="s2", tools=[LOOK])
    assert later.ok
    # the fake echoes the user turns it saw: the tool round is history, the results are not user turns
    assert later.text == "echo 2: and now?"


async def test_results_that_answer_no_pending_call_are_refused(worker_port):
    async with client(worker_port) as c:
        await c.ask("maze", "hello", session="s3")
        reply = await c.ask(
            "maze", "x", session="s3", toolResults=[{"toolCallId": "call-nothing", "content": "?"}], tools=[LOOK]
        )
        wrong = await c.ask("maze", "call:look", session="s4", tools=[LOOK])
        mismatch = await c.ask(
            "maze", "x", session="s4", toolResults=[{"toolCallId": "call-other", "content": "?"}], tools=[LOOK]
        )
    assert reply.error_code == "bad_request"
    assert "made no tool calls" in (reply.error_message or "")
    assert wrong.finish_reason == "tool_calls"
    assert mismatch.error_code == "bad_request"
    assert "exactly the last turn's calls" in (mismatch.error_message or "")


async def test_calls_that_cannot_run_say_why_and_the_client_reports_it_back(worker_port):
    seen: list[str] = []
    async with client(worker_port) as c:
        reply = await c.ask(
            "maze",
            'call:move:{"direction":"up"} call:teleport',
            session="s5",
            tools=[MOVE],
            on_tool=lambda name, _a: seen.append(name) or "ran",
        )
    (first,) = reply.previous
    bad_args, unknown = first.tool_calls
    assert "do not match the schema" in bad_args["error"]
    assert bad_args["arguments"] == {"direction": "up"}
    assert unknown["error"] == "unknown tool 'teleport'"
    assert seen == []  # neither ran: each was answered with its error
    assert reply.text == "results: error: " + bad_args["error"] + " | error: " + unknown["error"]


async def test_forced_choices_call_a_tool_and_none_hides_them(worker_port):
    async with client(worker_port) as c:
        named = await c.ask("maze", "hello", session="n1", tools=[LOOK, MOVE], toolChoice=_named("move"))
        required = await c.ask("maze", "hello", session="n2", tools=[LOOK, MOVE], toolChoice="required")
        none = await c.ask("maze", "call:look", session="n3", tools=[LOOK], toolChoice="none")
    assert [t["name"] for t in named.tool_calls] == ["move"]
    assert named.tool_calls[0]["arguments"] == {"direction": ""}  # the fake's minimal schema instance
    assert [t["name"] for t in required.tool_calls] == ["look"]
    assert none.finish_reason == "stop"
    assert none.tool_calls == []


async def test_a_stream_shows_each_call_as_an_event_then_the_final_reply(worker_port):
    async with client(worker_port) as c:
        chunks = [ch async for ch in c.stream("maze", "call:look call:look", session="st", tools=[LOOK])]
    assert [ch.done for ch in chunks] == [False, False, True]
    assert chunks[-1].reply is not None
    assert chunks[-1].reply.finish_reason == "tool_calls"
    assert "<tool_call>" not in "".join(ch.delta for ch in chunks)  # a call's markup is never shown


async def test_a_stateless_chat_carries_its_own_calls_and_results(worker_port):
    chat = [
        {"role": "user", "content": "look around"},
        {"role": "assistant", "content": None, "toolCalls": [{"id": "c1", "name": "look", "arguments": {}}]},
        {"role": "tool", "toolCallId": "c1", "content": "a door"},
    ]
    async with client(worker_port) as c:
        reply = await c.ask("maze", "", messages=chat, tools=[LOOK])
    assert reply.ok, reply.raw
    assert reply.text == "results: a door"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "bad_request"),
        ({"tools": [MOVE, MOVE]}, "bad_request"),
        ({"toolChoice": "required"}, "bad_request"),
        ({"tools": [LOOK], "toolChoice": {"type": "function", "function": {}}}, "bad_request"),
        ({"tools": [LOOK], "toolChoice": _named("move")}, "bad_request"),
        ({"tools": [LOOK] * 33}, "too_large"),
        ({"tools": [{"type": "function", "function": {"name": "t", "parameters": {"type": 5}}}]}, "bad_request"),
    ],
)
async def test_malformed_tools_are_typed_refusals(worker_port, fields, code):
    async with client(worker_port) as c:
        reply = await c.ask("maze", "hi", session="bad", **fields)
    assert reply.error_code == code, reply.raw


async def test_a_classic_request_with_tools_is_refused_on_its_classic_topic(worker_port):
    async with peer(worker_port, ["maze/assistant_response/#"]) as p:
        await p.publish("maze/user_input", json.dumps({"message": "hi", "tools": [LOOK], "sessionId": "cl"}))
        await p.wait_for(lambda got: len(got) >= 1)
    assert p.received[0].payload.decode().startswith("Error: ")
    assert "v2" in p.received[0].payload.decode()


async def test_the_cli_offers_tools_from_a_file_and_prints_the_calls(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([MOVE, LOOK]))
    async with running_worker() as w:
        cmd = [sys.executable, "-m", "worker", "ask", "driving", "hello", "--broker", f"mqtt://127.0.0.1:{w.port}"]
        out = await asyncio.to_thread(
            subprocess.run,
            [*cmd, "--tools", str(tools), "--tool-choice", "move"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    call = json.loads(line)
    assert call["name"] == "move"
    assert call["arguments"] == {"direction": ""}
