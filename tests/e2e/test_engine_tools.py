"""Tools on the real engine (demo model, vLLM's hermes parser and structured outputs; marker e2e)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import jsonschema
import pytest
from support import ROOT, WorkerProcess

from worker.client import Client
from worker.config import BrokerConfig

pytestmark = pytest.mark.e2e

DIRECTION = {"type": "string", "enum": ["north", "south", "east", "west"]}
MOVE = {
    "type": "function",
    "function": {
        "name": "move",
        "description": "Move the robot one cell in a direction.",
        "parameters": {
            "type": "object",
            "properties": {"direction": DIRECTION, "steps": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["direction", "steps"],
        },
    },
}
LOOK = {
    "type": "function",
    "function": {
        "name": "look",
        "description": "Look in a direction and say what is there.",
        "parameters": {"type": "object", "properties": {"direction": DIRECTION}, "required": ["direction"]},
    },
}
PROMPTS = [
    f"The robot is in a maze. {hint} Which way should it go?"
    for hint in (
        "There is a wall to the north.",
        "The exit is east.",
        "A door opens to the south.",
        "It came from the west.",
        "Light shines from the north.",
    )
]


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


async def test_a_named_choice_returns_arguments_that_match_the_schema_every_time(worker_process: WorkerProcess):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as c:
        replies = await asyncio.gather(
            *(
                c.ask(
                    "general",  # no per-client rate limit: 20 requests go at once
                    PROMPTS[i % len(PROMPTS)],
                    session=f"named-{i}",
                    tools=[LOOK, MOVE],
                    toolChoice=named("move"),
                    maxTokens=48,
                    temperature=0.7,
                    seed=i,
                    timeout_s=300,
                )
                for i in range(20)
            )
        )
    valid = 0
    for reply in replies:
        assert reply.ok, reply.raw
        assert reply.finish_reason == "tool_calls", json.dumps(reply.raw)
        (call,) = reply.tool_calls
        assert call["name"] == "move"
        assert "error" not in call, call
        jsonschema.validate(call["arguments"], MOVE["function"]["parameters"])
        valid += 1
    print(f"\n[e2e] named toolChoice: {valid}/20 calls valid against the schema")
    assert valid == 20


async def test_a_two_round_robot_conversation_runs_look_then_move(worker_process: WorkerProcess):
    robot = {"position": [0, 0], "calls": []}

    def run(name: str, arguments: dict) -> str:
        robot["calls"].append((name, arguments))
        if name == "look":
            return json.dumps({"direction": arguments["direction"], "sees": "an open corridor"})
        dx, dy = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}[arguments["direction"]]
        robot["position"] = [
            robot["position"][0] + dx * arguments["steps"],
            robot["position"][1] + dy * arguments["steps"],
        ]
        return json.dumps({"moved": arguments["steps"], "position": robot["position"]})

    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as c:
        first = await c.ask(
            "maze", "Look north first.", session="robot", tools=[LOOK, MOVE], toolChoice=named("look"), maxTokens=48
        )
        (look,) = first.tool_calls
        result = [{"toolCallId": look["id"], "content": run(look["name"], look["arguments"])}]
        second = await c.ask(
            "maze",
            "",
            session="robot",
            tools=[LOOK, MOVE],
            toolChoice=named("move"),
            toolResults=result,
            maxTokens=48,
        )
        (move,) = second.tool_calls
        run(move["name"], move["arguments"])
    assert [name for name, _ in robot["calls"]] == ["look", "move"]
    assert robot["position"] != [0, 0]
    print(f"\n[e2e] robot calls: {robot['calls']} -> position {robot['position']}")


async def test_the_simulated_robot_is_driven_by_device_tool_rounds(worker_process: WorkerProcess):
    """make run + examples/micropython/robot.py: each request names its tool; the worker runs the rounds."""
    micropython = ROOT / "examples" / "micropython"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(micropython / "shim"), str(micropython)])}
    cmd = [
        sys.executable,
        "-u",
        str(micropython / "robot.py"),
        "127.0.0.1",
        str(worker_process.port),
        "robot-e2e",
        "300",
    ]
    robot = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    transcript = []
    try:
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}"), client_id="maze-e2e") as c:
            await asyncio.sleep(2)  # the retained announcement reaches the worker
            for message, tool in [("Look east: what is there?", "look"), ("Now move east.", "move")]:
                reply = await c.ask(
                    "maze", message, session="robot-e2e", toolChoice=named(tool), maxTokens=64, temperature=0
                )
                assert reply.ok, reply.raw
                transcript.append((message, reply.raw.get("trace"), reply.text, reply.finish_reason))
                assert reply.raw["trace"][0]["calls"][0]["name"] == tool
            await c._bus.publish("maze/capabilities/robot-e2e", b"", retain=True)
    finally:
        robot.terminate()
        output = robot.communicate(timeout=10)[0]
    for message, trace, text, finish in transcript:
        print(f"\n[e2e] > {message}\n[e2e] trace {json.dumps(trace)}\n[e2e] < {text!r} ({finish})")
    print("[e2e] robot:", output.strip().replace("\n", " | "))
    assert "call look" in output
    assert "call move" in output
