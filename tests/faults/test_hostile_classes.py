"""Issue 26's reproductions, each on the shipped deploy/ (two listeners, ACLs) with the attacker's app account.

1. a reply topic holding one forbidden code point got the worker dropped by Mosquitto, in a loop;
2. a reply topic holding a lone surrogate ended its job with no final reply and its message unacked;
3. 60,000 MQTT v5 User Properties in one PUBLISH held the event loop for 19 s;
4. a lone surrogate in a text field was `engine_error` with a logged traceback, and the turn was stored.
The classes these belong to are generated in tests/unit/test_text_classes.py, tests/unit/test_packets.py
and tests/faults/test_packet_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from rawmqtt import RawClient, user_properties
from structlog.testing import capture_logs
from support import DeployedMosquitto, Peer, RedisServer, bodies, running_worker, until

from worker.config import BrokerConfig
from worker.transport.bus import Bus

pytestmark = pytest.mark.faults

APPS = {"mallory": "mallory-pw-1", "eve": "eve-pw-2", "fleet": "fleet-pw-3"}
WORKER_ACCOUNT = {"username": "worker", "password": "worker-pw-0"}


@pytest.fixture
def deployed():
    broker = DeployedMosquitto(APPS, {"worker": "worker-pw-0"}).start()
    yield broker
    broker.stop()


async def app_peer(broker: DeployedMosquitto, user: str, topics: list[str]) -> tuple[Bus, Peer]:
    bus = Bus(BrokerConfig(url=broker.app_url, username=user, password=APPS[user], protocol="5"), user)
    await bus.__aenter__()
    p = Peer(bus)
    p._reader = asyncio.create_task(p._read())
    await bus.subscribe(topics)
    return bus, p


def code_of(body: dict) -> str:
    return body.get("error", {}).get("code", "ok")


def finals(p: Peer, topic: str) -> list[dict]:
    return [b for b in bodies(p.received, topic) if b.get("done")]


async def still_answers(p: Peer, tag: str) -> None:
    await p.publish("maze/user_input", {"v": 2, "clientId": "mallory", "requestId": tag, "message": f"ping {tag}"})
    await p.wait_for(lambda got: any(b.get("text", "").endswith(f"ping {tag}") for b in bodies(got)), timeout_s=20)


FORBIDDEN = ["\x01", "\x1f", "\x7f", "\x85", "\x9f", "\ufdd0", "\ufffe", "\uffff", "\U0001fffe", "\U0010ffff"]


async def test_01_02_unpublishable_reply_topics_are_bad_request_on_the_senders_topic_and_nothing_is_held(deployed):
    worker = WORKER_ACCOUNT
    async with running_worker(projects=["maze", "driving"], broker_url=deployed.worker_url, broker=worker) as w:
        bus, p = await app_peer(deployed, "mallory", ["maze/response/mallory", "maze/assistant_response/s"])
        _, watch = await app_peer(deployed, "fleet", ["vllm-worker/#"])
        with capture_logs() as logs:
            sent = 0
            for i, char in enumerate(FORBIDDEN):  # 1: controls and non-characters, both dialects
                await p.publish(
                    "maze/user_input",
                    {
                        "v": 2,
                        "clientId": "mallory",
                        "requestId": f"c{i}",
                        "message": "hi",
                        "replyTopic": f"maze/response/a{char}b",
                    },
                )
                await p.publish(
                    "maze/user_input",
                    {"sessionId": "s", "message": "hi", "replyTopic": f"maze/assistant_response/{char}"},
                )
                sent += 1
            for i in range(140):  # 2: more lone surrogates than the worker's ReceiveMaximum
                raw = '{"v":2,"clientId":"mallory","requestId":"u%d","message":"hi",' % i  # noqa: UP031
                await p.publish("maze/user_input", (raw + '"replyTopic":"maze/response/x\\udc80"}').encode())
            await p.wait_for(lambda _: len(finals(p, "maze/response/mallory")) >= sent + 140, timeout_s=30)
            await still_answers(p, "after")
        assert w.service._bus is not None
        service_bus = w.service._bus
        await until(lambda: service_bus.unacked == 0)  # the last final's PUBACK may still be on its way
        unacked = service_bus.unacked
        bus_states = [json.loads(m.payload).get("state") for m in watch.received if m.topic.endswith("/status")]
        await bus.__aexit__(None, None, None)
    codes = [code_of(b) for b in finals(p, "maze/response/mallory")]
    assert codes[: sent + 140] == ["bad_request"] * (sent + 140)
    classic = [m.payload for m in p.received if m.topic == "maze/assistant_response/s"]
    assert len(classic) == sent
    assert all(c.startswith(b"Error: ") for c in classic)
    assert "offline" not in bus_states  # never dropped by the broker: no Last Will
    assert not [e for e in logs if e["event"] in ("bus.disconnected", "job.failed", "job.unanswered", "reply.blocked")]
    assert unacked == 0


async def test_03_a_flood_of_user_properties_is_answered_too_large_and_the_worker_stays_responsive(deployed):
    async with running_worker(projects=["maze"], broker_url=deployed.worker_url, broker=WORKER_ACCOUNT) as w:
        bus, p = await app_peer(deployed, "mallory", ["maze/response/mallory"])
        attacker = await asyncio.to_thread(RawClient, deployed.app_port, "eve", 10.0, "eve", APPS["eve"])
        try:
            body = json.dumps({"v": 2, "clientId": "mallory", "requestId": "flood", "message": "hi"}).encode()
            for _ in range(2):  # 2 x 60,000 (0.9 MiB each): ~40 s of paho's decoder before
                reason = await asyncio.to_thread(attacker.publish, b"maze/user_input", body, user_properties(60_000))
                assert reason == 0
            await p.wait_for(lambda _: len(finals(p, "maze/response/mallory")) >= 1, timeout_s=20)
            await still_answers(p, "after-flood")
        finally:
            attacker.close()
            await bus.__aexit__(None, None, None)
        assert w.service._bus is not None
    flood = [b for b in finals(p, "maze/response/mallory") if b.get("requestId") == "flood"]
    assert [code_of(b) for b in flood] == ["too_large", "too_large"]  # refused at parse time: each copy answered
    assert "MQTT properties" in flood[0]["error"]["message"]


TEXT_ATTACKS = {
    "message": '"message":"hi \\udc80"',
    "systemPrompt": '"message":"hi","systemPrompt":"be \\ud800 nice"',
    "stop": '"message":"hi","stop":["\\udfff"]',
    "messages": '"messages":[{"role":"user","content":"\\udc80"}]',
}


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_04_a_lone_surrogate_in_any_text_field_is_bad_request_logged_in_one_line_and_not_stored(deployed, state):
    redis = RedisServer().start() if state == "redis" else None
    try:
        state_cfg = {"url": redis.url} if redis is not None else {}
        async with running_worker(
            projects=["maze"], broker_url=deployed.worker_url, broker=WORKER_ACCOUNT, state=state_cfg
        ):
            bus, p = await app_peer(deployed, "mallory", ["maze/response/mallory"])
            with capture_logs() as logs:
                for name, fields in TEXT_ATTACKS.items():
                    raw = '{"v":2,"clientId":"mallory","sessionId":"t","requestId":"%s",%s}' % (name, fields)  # noqa: UP031
                    await p.publish("maze/user_input", raw.encode())
                await p.wait_for(lambda _: len(finals(p, "maze/response/mallory")) >= len(TEXT_ATTACKS))
                await p.publish("maze/user_input", {"v": 2, "clientId": "mallory", "sessionId": "t", "message": "next"})
                await p.wait_for(lambda got: any(b.get("text", "").endswith(": next") for b in bodies(got)))
            await bus.__aexit__(None, None, None)
    finally:
        if redis is not None:
            redis.stop()
    refused = {
        b["requestId"]: code_of(b) for b in finals(p, "maze/response/mallory") if b.get("requestId") in TEXT_ATTACKS
    }
    assert refused == dict.fromkeys(TEXT_ATTACKS, "bad_request")
    assert any(b.get("text") == "echo 1: next" for b in bodies(p.received))  # no refused turn in the history
    assert not [e for e in logs if "exc_info" in e or e.get("log_level") == "error"]
