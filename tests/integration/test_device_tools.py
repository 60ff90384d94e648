"""Device tools (docs/protocol.md section 3b): the worker calls a simulated device over real Mosquitto.

The fake engine's calls are scripted by the user's words (`call:NAME[:JSON]`, `loop:NAME` to call again
after every result); the simulated device is a plain MQTT client on MQTT 5 or 3.1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support import ROOT, Mosquitto, peer, running_worker

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine
from worker.message import InboundMessage

LAB = """
name = "lab"
system_prompt = "You drive a lab robot."
capabilities = true
max_tool_rounds = 3

[[tools]]
name = "move"
description = "Move the robot one cell."
topic = "lab/tools/robot-1/move"
timeout_s = 2.0
[tools.parameters]
type = "object"
required = ["direction"]
[tools.parameters.properties.direction]
type = "string"
enum = ["north", "south"]

[[tools]]
name = "slow"
description = "A device that never answers."
topic = "lab/tools/robot-1/slow"
timeout_s = 0.3
"""

Answer = Callable[[dict], dict | None]


@pytest.fixture
def topics_dir(tmp_path: Path) -> str:
    shutil.copy(ROOT / "topics" / "maze.toml", tmp_path / "maze.toml")
    (tmp_path / "lab.toml").write_text(LAB)
    return str(tmp_path)


@contextlib.asynccontextmanager
async def fleet(topics_dir: str, engine: FakeEngine | None = None) -> AsyncIterator[tuple[Mosquitto, int]]:
    mosq = Mosquitto().start()
    try:
        async with running_worker(
            engine, projects=["lab", "maze"], broker_url=mosq.url, worker={"topics_dir": topics_dir}
        ) as w:
            yield mosq, w.port
    finally:
        mosq.stop()


@contextlib.asynccontextmanager
async def device(port: int, answer: Answer, protocol: str = "5", client_id: str = "robot-1") -> AsyncIterator[list]:
    """A device serving `lab/tools/#`: `answer(call)` is its reply body (None: it stays silent)."""
    calls: list[dict] = []
    async with peer(port, ["lab/tools/#"], client_id=client_id, protocol=protocol) as p:

        async def serve() -> None:
            seen = 0
            while True:
                await p.wait_for(lambda got, seen=seen: len(got) > seen, timeout_s=3600)
                for msg in p.received[seen:]:
                    seen += 1
                    await handle(msg)

        async def handle(msg: InboundMessage) -> None:
            call = json.loads(msg.payload)
            calls.append(call | {"_topic": msg.topic, "_response_topic": msg.response_topic})
            body = answer(call)
            if body is not None:
                await p.bus.publish(
                    call["replyTopic"], json.dumps(body).encode(), correlation_data=msg.correlation_data
                )

        task = asyncio.create_task(serve())
        try:
            yield calls
        finally:
            task.cancel()


def moved(call: dict) -> dict:
    return {"callId": call["callId"], "content": f"moved {call['arguments'].get('direction', '?')}"}


def client(port: int) -> Client:
    return Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id="lab-app")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_device_tool_runs_on_the_device_and_the_model_reads_its_result(topics_dir, protocol):
    async with fleet(topics_dir) as (_, port), device(port, moved, protocol) as calls, client(port) as c:
        reply = await c.ask("lab", 'call:move:{"direction":"north"}', session="d1", request_id="r-dev")
    assert reply.ok, reply.raw
    assert reply.text == "results: moved north"
    assert reply.finish_reason == "stop"
    (call,) = calls
    assert call["_topic"] == "lab/tools/robot-1/move"
    assert call["replyTopic"] == "lab/worker/test-worker/tool_result"
    assert call["arguments"] == {"direction": "north"}
    assert call["requestId"] == "r-dev"
    if protocol == "5":
        assert call["_response_topic"] == "lab/worker/test-worker/tool_result"
    (round_1,) = reply.raw["trace"]
    assert round_1["round"] == 1
    assert round_1["calls"][0]["result"] == "moved north"
    assert reply.raw["usage"]["completionTokens"] > round_1["usage"]["completionTokens"]  # usage sums the rounds


async def test_a_timeout_a_device_error_bad_arguments_and_an_unknown_tool_are_results(topics_dir):
    def answer(call: dict) -> dict | None:
        return None if call["name"] == "slow" else {"callId": call["callId"], "error": "jammed"}

    async with fleet(topics_dir) as (_, port), device(port, answer) as calls, client(port) as c:
        slow = await c.ask("lab", "call:slow", session="e1")
        jammed = await c.ask("lab", 'call:move:{"direction":"north"}', session="e2")
        bad = await c.ask("lab", 'call:move:{"direction":"up"}', session="e3")
        unknown = await c.ask("lab", "call:fly", session="e4")
    assert slow.text == "results: error: the device did not answer within 0.3 s"
    assert slow.raw["trace"][0]["calls"][0]["error"] == "timeout"
    assert jammed.text == "results: error: jammed"
    assert bad.text.startswith("results: error: arguments do not match the schema")
    assert unknown.text == "results: error: unknown tool 'fly'"
    assert [c["name"] for c in calls] == ["slow", "move"]  # bad and unknown calls never reach a device
    assert all(r.ok and r.finish_reason == "stop" for r in (slow, jammed, bad, unknown))


async def test_the_round_limit_ends_with_a_typed_finish(topics_dir):
    async with fleet(topics_dir) as (_, port), device(port, moved) as calls, client(port) as c:
        reply = await c.ask("lab", 'loop:move:{"direction":"south"}', session="l1")
    assert reply.ok
    assert reply.finish_reason == "tool_rounds"
    assert len(calls) == 3  # max_tool_rounds
    assert [r["round"] for r in reply.raw["trace"]] == [1, 2, 3]


async def test_32_calls_pend_at_once_while_the_engine_serves_others(topics_dir):
    engine = FakeEngine(token_delay_s=0.01)
    async with (
        fleet(topics_dir, engine) as (_, port),
        client(port) as c,
        peer(port, ["lab/tools/#"], client_id="robot-1", protocol="5") as dev,
    ):
        asks = [
            asyncio.create_task(c.ask("lab", 'call:move:{"direction":"north"}', session=f"p{i}", timeout_s=60))
            for i in range(32)
        ]
        await dev.wait_for(lambda got: len(got) == 32, timeout_s=30)  # all 32 calls pending at once
        other = await c.ask("maze", "meanwhile", session="other")  # the engine is not held by them
        assert other.ok
        assert not any(t.done() for t in asks)
        for msg in dev.received:
            call = json.loads(msg.payload)
            await dev.bus.publish(call["replyTopic"], json.dumps(moved(call)).encode())
        replies = await asyncio.gather(*asks)
    assert all(r.text == "results: moved north" for r in replies)


async def test_devices_announce_their_own_tools_and_hostile_announcements_are_refused(topics_dir):
    beep = {"name": "beep", "description": "Beep.", "parameters": {"type": "object"}, "timeoutMs": 1000}
    async with fleet(topics_dir) as (_, port), device(port, moved, client_id="buzzer") as calls, client(port) as c:
        async with peer(port, [], client_id="announcer", protocol="5") as a:
            await a.bus.publish("lab/capabilities/buzzer", json.dumps({"tools": [beep]}).encode(), retain=True)
            for topic, body in [
                ("lab/capabilities/bad id", {"tools": [beep]}),
                ("lab/capabilities/big", {"tools": [beep] * 17}),
                ("lab/capabilities/schema", {"tools": [beep | {"name": "b2", "parameters": {"type": 5}}]}),
                ("lab/capabilities/shadow", {"tools": [beep | {"name": "move"}]}),
                ("maze/capabilities/other", {"tools": [beep | {"name": "maze_only"}]}),
            ]:
                await a.bus.publish(topic, json.dumps(body).encode(), retain=True)
        await asyncio.sleep(0.3)
        beeped = await c.ask("lab", "call:beep", session="b1")
        shadowed = await c.ask("lab", 'call:move:{"direction":"north"}', session="b2")
        other_project = await c.ask("lab", "call:maze_only", session="b3")
    assert beeped.text == "results: moved ?"  # the device's handler answered on its own topic
    assert calls[0]["_topic"] == "lab/tools/buzzer/beep"
    assert shadowed.text == "results: moved north"
    assert [c["_topic"] for c in calls] == ["lab/tools/buzzer/beep", "lab/tools/robot-1/move"]
    assert other_project.text == "results: error: unknown tool 'maze_only'"


async def test_results_nobody_waits_for_are_dropped_and_counted(topics_dir):
    async with fleet(topics_dir) as (_, port):
        async with peer(port, [], client_id="stray", protocol="5") as s:
            for body in [{"callId": "call-none", "content": "x"}, {"nope": 1}, "not json"]:
                payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                await s.bus.publish("lab/worker/test-worker/tool_result", payload)
        async with client(port) as c:
            reply = await c.ask("maze", "still here", session="z")
    assert reply.ok


def test_a_project_file_with_a_tool_topic_in_a_reserved_subtree_is_refused(tmp_path):
    from worker.errors import ConfigError
    from worker.projects import load_project

    for topic in ("lab/response/x", "lab/worker/w/tool_result", "maze/tools/x", "lab/tools/#", "lab/"):
        (tmp_path / "lab.toml").write_text(LAB.replace("lab/tools/robot-1/move", topic))
        with pytest.raises(ConfigError, match="tool topic"):
            load_project(tmp_path / "lab.toml")


async def test_the_trace_keeps_a_bounded_part_of_each_result_and_the_model_reads_all_of_it(topics_dir):
    """16 rounds x 16 calls of 16 KiB results must not make a final reply the broker refuses."""

    def big(call: dict) -> dict:
        return {"callId": call["callId"], "content": "x" * 16_000}

    async with fleet(topics_dir) as (_, port), device(port, big), client(port) as c:
        reply = await c.ask("lab", 'call:move:{"direction":"north"}', session="big")
    (step,) = reply.raw["trace"][0]["calls"]
    assert (len(step["result"]), step["resultChars"]) == (1024, 16_000)
    assert reply.text == "results: " + "x" * 16_000
