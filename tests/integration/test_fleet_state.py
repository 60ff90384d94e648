"""A fleet on one Redis (issue 15's "done means"): 3 fake-engine workers in one share group on a real
Mosquitto and a real redis-server. Conversations, retries and budgets hold whichever worker a request
lands on, across a SIGKILL, a restart of every worker and a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator

import pytest
from support import ROOT, Mosquitto, bodies, peer, wait_ready, worker_subprocess

from worker.client import Client
from worker.config import BrokerConfig

IDS = ["fleet-a", "fleet-b", "fleet-c"]
ECHO = re.compile(r"echo (\d+): (.*)")


@pytest.fixture
def mosquitto():
    broker = Mosquitto("persistence true\npersistence_location {dir}/\n").start()
    yield broker
    broker.stop()


def fleet_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "VLLM_WORKER_STATE__URL": redis_url,
        "VLLM_WORKER_STATE__LEASE_S": "1.5",
        "VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": "0.5",
        **extra,
    }


@contextlib.contextmanager
def fleet(broker_url: str, env: dict[str, str], ids: list[str] = IDS) -> Iterator[dict[str, object]]:
    with contextlib.ExitStack() as stack:
        yield {i: stack.enter_context(worker_subprocess(broker_url, i, ["general"], **env)) for i in ids}


def client(port: int, client_id: str = "robot") -> Client:
    """Without affinity: these tests spread one session's turns over the fleet (tests/faults/test_affinity.py)."""
    return Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=client_id, affinity=False)


def turns_seen(text: str) -> int:
    """The fake engine answers "echo N: message", N = the user turns its prompt held."""
    match = ECHO.fullmatch(text)
    assert match, text
    return int(match.group(1))


async def test_a_conversation_keeps_its_history_on_every_worker_in_order_and_across_restarts(mosquitto, redis_server):
    env = fleet_env(redis_server.url)
    async with client(mosquitto.port) as c:
        with fleet(mosquitto.url, env):
            await wait_ready(mosquitto.port, *IDS)
            workers = set()
            for turn in range(1, 7):
                reply = await c.ask("general", f"turn {turn}", session="s1", request_id=f"s1-{turn}", timeout_s=30)
                assert reply.ok, reply
                assert turns_seen(reply.text) == turn  # every earlier turn was in its prompt
                workers.add(reply.raw["worker"])
            assert len(workers) >= 2, workers
            # two turns of one session at once: one after the other, whichever workers they land on
            both = await asyncio.gather(
                c.ask("general", "at once A", session="s2", request_id="s2-a", timeout_s=30),
                c.ask("general", "at once B", session="s2", request_id="s2-b", timeout_s=30),
            )
            assert sorted(turns_seen(r.text) for r in both) == [1, 2]  # never both run on an empty history
        with fleet(mosquitto.url, env):  # every worker restarted: the conversation goes on
            await wait_ready(mosquitto.port, *IDS)
            reply = await c.ask("general", "after restart", session="s1", request_id="s1-7", timeout_s=30)
            assert turns_seen(reply.text) == 7


async def test_a_retry_on_another_worker_is_answered_from_the_cache(mosquitto, redis_server):
    async with peer(mosquitto.port, ["general/response/robot"], protocol="5") as p:
        with fleet(mosquitto.url, fleet_env(redis_server.url)):
            await wait_ready(mosquitto.port, *IDS)
            body = {"v": 2, "clientId": "robot", "sessionId": "d", "requestId": "same", "message": "once"}
            for n in range(1, 4):  # round robin: each copy lands on another worker
                await p.publish("general/user_input", body)
                await p.wait_for(lambda got, n=n: len(bodies(got)) >= n, timeout_s=20)
    finals = [m.payload for m in p.received]
    assert len(finals) == 3
    assert len(set(finals)) == 1  # byte for byte the first answer: same worker, same text
    assert turns_seen(json.loads(finals[0])["text"]) == 1  # generated once: a second run would see 2 turns


async def test_a_per_client_rate_limit_holds_fleet_wide(mosquitto, redis_server, tmp_path):
    topics = tmp_path / "topics"
    topics.mkdir()
    rate, burst, seconds = 10 / 60, 10, 18.0
    text = (ROOT / "topics" / "general.toml").read_text()
    (topics / "general.toml").write_text(text + f"\n[rate_limit]\nrequests_per_s = {rate}\nburst = {burst}\n")
    env = fleet_env(redis_server.url, VLLM_WORKER_WORKER__TOPICS_DIR=str(topics))
    async with peer(mosquitto.port, ["general/response/limited"], protocol="5") as p:
        with fleet(mosquitto.url, env):
            await wait_ready(mosquitto.port, *IDS)
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < seconds:
                body = {
                    "v": 2,
                    "clientId": "limited",
                    "sessionId": f"x{sent}",
                    "requestId": f"q{sent}",
                    "message": "hi",
                }
                await p.publish("general/user_input", body)
                sent += 1
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            await p.wait_for(lambda got: len(bodies(got)) >= sent, timeout_s=20)
    replies = bodies(p.received)
    granted = sum(1 for b in replies if "error" not in b)
    refused = [b for b in replies if "error" in b]
    assert {b["error"]["code"] for b in refused} == {"rate_limited"}
    expected = burst + rate * elapsed  # one bucket for the fleet; 3 per-worker buckets would grant ~3 x burst
    assert abs(granted - expected) <= max(1.0, 0.1 * expected), (granted, expected, sent)


async def test_a_killed_holder_never_blocks_its_session(mosquitto, redis_server):
    env = fleet_env(redis_server.url, VLLM_WORKER_FAKE_TOKEN_DELAY_S="0.2")
    async with (
        client(mosquitto.port) as c,
        peer(mosquitto.port, ["vllm-worker/+/telemetry"], protocol="5") as telemetry,
    ):
        with fleet(mosquitto.url, env) as procs:
            await wait_ready(mosquitto.port, *IDS)
            assert turns_seen((await c.ask("general", "one", session="k", request_id="k1", timeout_s=30)).text) == 1
            mark = len(telemetry.received)
            long = asyncio.create_task(
                c.ask("general", " ".join(["word"] * 40), session="k", request_id="k2", timeout_s=60, retries=0)
            )
            holder = await _generating_worker(telemetry, mark)
            procs[holder].send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
            started = time.monotonic()
            reply = await c.ask("general", "three", session="k", request_id="k3", timeout_s=15)
            waited = time.monotonic() - started
            assert reply.ok, reply
            assert turns_seen(reply.text) == 2  # turn 2 died with its worker and was never recorded
            assert reply.raw["worker"] != holder
            assert waited < 15  # the dead holder's lease (1.5 s) lapsed; nobody waited for good
            long.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await long


async def _generating_worker(telemetry, mark: int) -> str:
    """The worker whose engine is running the long turn: two reports in a row (0.5 s apart) received after
    `mark` say so. One report is not enough: turn 1's worker may publish "running" during turn 1 (0.2 s
    long) and that report can arrive after the mark; CI once killed that innocent worker."""
    async with asyncio.timeout(20):
        while True:
            latest: dict[str, list[int]] = {}
            for m in telemetry.received[mark:]:
                report = json.loads(m.payload)
                latest.setdefault(str(report["worker"]), []).append(report["engine"]["running"])
            for worker, running in latest.items():
                if len(running) >= 2 and min(running[-2:]) >= 1:
                    return worker
            await asyncio.sleep(0.1)


async def test_redis_away_refuses_stateful_turns_serves_stateless_ones_and_recovers(mosquitto, redis_server):
    async with (
        client(mosquitto.port) as c,
        peer(mosquitto.port, ["vllm-worker/+/telemetry", "vllm-worker/+/status"], protocol="5") as watch,
    ):
        with fleet(mosquitto.url, fleet_env(redis_server.url)) as procs:
            await wait_ready(mosquitto.port, *IDS)
            assert turns_seen((await c.ask("general", "before", session="r", request_id="r1", timeout_s=30)).text) == 1
            redis_server.stop(keep=True)
            for i in range(3):  # each worker finds out on its own
                refused = await c.ask("general", "during", session="r", request_id=f"r-down-{i}", timeout_s=10)
                assert refused.error_code == "state_unavailable", refused
                assert refused.retry_after_ms
                stateless = await c.ask(
                    "general",
                    "",
                    session="r",
                    request_id=f"m-down-{i}",
                    timeout_s=10,
                    messages=[{"role": "user", "content": "no history needed"}],
                )
                assert stateless.ok, stateless
            watch.received.clear()
            await watch.wait_for(lambda got: _degraded(got) >= set(IDS), timeout_s=10)
            redis_server.start()  # same port, same append-only file
            deadline = time.monotonic() + 20
            while True:
                reply = await c.ask(
                    "general", "after", session="r", request_id=f"r-up-{time.monotonic()}", timeout_s=10
                )
                if reply.ok or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert reply.ok, reply
            assert turns_seen(reply.text) == 2  # the history from before the outage is there
            assert all(p.poll() is None for p in procs.values())  # type: ignore[attr-defined]
    assert not any(
        json.loads(m.payload).get("state") == "offline" for m in watch.received if m.topic.endswith("/status")
    )


def _degraded(got) -> set[str]:
    out = set()
    for m in got:
        if m.topic.endswith("/telemetry") and (json.loads(m.payload).get("state") or {}).get("degraded"):
            out.add(json.loads(m.payload)["worker"])
    return out
