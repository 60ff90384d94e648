"""Devices on the shipped deploy/ (both listeners, ACLs): a device account may announce its own tools,
read its own calls and answer any worker's call, and nothing else; apps cannot pose as devices."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from support import DeployedMosquitto, Peer, running_worker

from worker.client import Client
from worker.config import BrokerConfig
from worker.transport.bus import Bus

pytestmark = pytest.mark.faults

ACCOUNTS = {"robot-1": "robot-pw-1", "mallory": "mallory-pw-2", "alice": "alice-pw-3"}
WORKER_ACCOUNT = {"username": "worker", "password": "worker-pw-0"}
LOOK = {"name": "look", "description": "Look.", "parameters": {"type": "object"}, "timeoutMs": 2000}


async def account(broker: DeployedMosquitto, user: str, topics: list[str]) -> tuple[Bus, Peer]:
    """A 3.1.1 connection (a denied publish is dropped silently there; on MQTT 5 it ends the connection)."""
    bus = Bus(BrokerConfig(url=broker.app_url, username=user, password=ACCOUNTS[user], protocol="3.1.1"), user)
    await bus.__aenter__()
    p = Peer(bus)
    p._reader = asyncio.create_task(p._read())
    if topics:
        await bus.subscribe(topics)
    return bus, p


async def serve_calls(p: Peer) -> None:
    seen = 0
    while True:
        await p.wait_for(lambda got, n=seen: len(got) > n, timeout_s=3600)
        for msg in p.received[seen:]:
            seen += 1
            call = json.loads(msg.payload)
            body = {"callId": call["callId"], "content": f"{msg.topic} saw a door"}
            await p.bus.publish(call["replyTopic"], json.dumps(body).encode())


async def test_a_device_account_serves_its_own_tools_and_cannot_pose_as_another():
    broker = DeployedMosquitto(ACCOUNTS, {"worker": "worker-pw-0"}).start()
    try:
        async with running_worker(projects=["maze"], broker_url=broker.worker_url, broker=WORKER_ACCOUNT):
            posing = json.dumps({"tools": [LOOK | {"name": "peek"}]}).encode()
            for user, topic in (("robot-1", "maze/capabilities/robot-2"), ("mallory", "maze/capabilities/mallory")):
                bus, _ = await account(broker, user, [])  # (a broker may close a connection after a denial)
                with contextlib.suppress(Exception):
                    await bus.publish(topic, posing, retain=True)
                with contextlib.suppress(Exception):
                    await bus.__aexit__(None, None, None)
            robot, robot_peer = await account(broker, "robot-1", ["maze/tools/robot-1/#"])
            server = asyncio.create_task(serve_calls(robot_peer))
            try:
                await robot.publish("maze/capabilities/robot-1", json.dumps({"tools": [LOOK]}).encode(), retain=True)
                await asyncio.sleep(0.5)
                config = BrokerConfig(url=broker.app_url, username="alice", password=ACCOUNTS["alice"])
                async with Client(config, client_id="alice") as c:
                    look = await c.ask("maze", "call:look", session="acl-1")
                    peek = await c.ask("maze", "call:peek", session="acl-2")
            finally:
                server.cancel()
                await robot.publish("maze/capabilities/robot-1", b"", retain=True)
                await robot.__aexit__(None, None, None)
        assert look.text == "results: maze/tools/robot-1/look saw a door", [m.topic for m in robot_peer.received]
        assert peek.text == "results: error: unknown tool 'peek'"  # neither posing announcement arrived
        assert all(m.topic.startswith("maze/tools/robot-1/") for m in robot_peer.received)
    finally:
        broker.stop()
