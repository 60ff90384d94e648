"""Session affinity on Mosquitto + Redis with two fake-engine workers (each with a simulated prefix cache):
sticky turns land on their worker and reuse its cache; they fall back to the shared topic when that
worker is offline, silent (paused) or does not invite; no turn is ever lost or answered twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import AsyncIterator

import pytest
from support import Mosquitto, RedisServer, bodies, peer, running_worker, wait_ready, worker_subprocess

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine, history_script

pytestmark = pytest.mark.faults

SYSTEM = "You are a maze navigator. " * 20  # a long shared prefix, like a real system prompt


@contextlib.asynccontextmanager
async def two_workers(mosquitto: Mosquitto, redis: RedisServer, **worker: object) -> AsyncIterator[list[FakeEngine]]:
    engines = [FakeEngine(history_script, prefix_cache=True) for _ in range(2)]
    state = {"url": redis.url, "lease_s": 3.0}
    async with (
        running_worker(engines[0], projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": "wa"}),
        running_worker(
            engines[1], projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": "wb", **worker}
        ),
    ):
        yield engines


def client(port: int, **kw: object) -> Client:
    return Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id="app", **kw)  # type: ignore[arg-type]


async def turns(c: Client, session: str, n: int) -> list:
    return [await c.ask("maze", f"turn {i}", session=session, systemPrompt=SYSTEM) for i in range(1, n + 1)]


async def test_sticky_turns_land_on_their_worker_and_reuse_its_cache(mosquitto, redis_server):
    async with two_workers(mosquitto, redis_server), client(mosquitto.port) as sticky:
        replies = await turns(sticky, "s1", 6)
    workers = [r.raw["worker"] for r in replies]
    assert all(r.ok for r in replies)
    assert workers[1:] == [workers[0]] * 5  # every later turn on the worker that answered the first
    assert replies[0].raw["affinity"] == {"worker": workers[0], "topic": f"maze/worker/{workers[0]}/user_input"}
    for r in replies[2:]:  # the conversation's prefix is in that worker's cache
        usage = r.raw["usage"]
        assert usage["cachedTokens"] >= 0.5 * usage["promptTokens"], usage
    assert replies[-1].text.endswith("turn 6")
    assert replies[-1].text.count("turn 1") == 1  # history holds each turn once


async def test_streamed_turns_follow_the_invitation_too(mosquitto, redis_server):
    """`Client.stream` (the console's playground uses it) sends a sticky session's turns to its worker."""

    async def streamed(c: Client, n: int) -> list:
        finals = []
        for i in range(1, n + 1):
            chunks = [ch async for ch in c.stream("maze", f"turn {i}", session="st", systemPrompt=SYSTEM)]
            assert [ch.seq for ch in chunks] == list(range(1, len(chunks) + 1))  # no `accepted` (seq 0) shown
            finals.append(chunks[-1].reply)
        return finals

    async with two_workers(mosquitto, redis_server), client(mosquitto.port) as sticky:
        replies = await streamed(sticky, 5)
    workers = [r.raw["worker"] for r in replies]
    assert workers[1:] == [workers[0]] * 4
    assert replies[-1].text.endswith("turn 5")
    assert sticky.fallbacks == 0


async def test_without_affinity_the_share_group_spreads_the_turns(mosquitto, redis_server):
    async with two_workers(mosquitto, redis_server), client(mosquitto.port, affinity=False) as shared:
        replies = await turns(shared, "s2", 6)
    assert {r.raw["worker"] for r in replies} == {"wa", "wb"}  # (what affinity avoids)


async def test_a_worker_that_does_not_invite_gets_no_sticky_turns(mosquitto, redis_server):
    async with two_workers(mosquitto, redis_server, affinity=False), client(mosquitto.port) as c:
        replies = await turns(c, "s3", 6)
    for r in replies:
        assert ("affinity" in r.raw) == (r.raw["worker"] == "wa")


async def test_an_offline_sticky_worker_is_skipped_and_the_session_goes_on(mosquitto, redis_server):
    state = {"url": redis_server.url, "lease_s": 3.0}
    stacks = {w: contextlib.AsyncExitStack() for w in ("wa", "wb")}
    for w, stack in stacks.items():
        engine = FakeEngine(history_script, prefix_cache=True)
        await stack.enter_async_context(
            running_worker(engine, projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": w})
        )
    try:
        async with client(mosquitto.port) as c:
            first = await turns(c, "s4", 3)
            stuck = first[-1].raw["worker"]
            await stacks[stuck].aclose()  # drains and publishes `offline`
            await asyncio.sleep(0.3)
            later = [await c.ask("maze", f"after {i}", session="s4", systemPrompt=SYSTEM) for i in range(2)]
    finally:
        for stack in stacks.values():
            await stack.aclose()
    other = "wb" if stuck == "wa" else "wa"
    assert [r.raw["worker"] for r in later] == [other, other]
    assert c.fallbacks == 0  # no time lost waiting: the client knew the sticky worker was not ready
    assert later[-1].text.endswith("after 1")
    assert later[-1].text.count("turn 3") == 1


async def test_a_silent_sticky_worker_costs_one_fallback_and_no_turn_is_lost_or_doubled(mosquitto, redis_server):
    env = {
        "VLLM_WORKER_STATE__URL": redis_server.url,
        "VLLM_WORKER_STATE__LEASE_S": "3",
        "VLLM_WORKER_FAKE_SCRIPT": "history",
        "VLLM_WORKER_FAKE_PREFIX_CACHE": "1",
    }
    with (
        worker_subprocess(mosquitto.url, "pa", ["maze"], **env) as pa,
        worker_subprocess(mosquitto.url, "pb", ["maze"], **env) as pb,
    ):
        await wait_ready(mosquitto.port, "pa", "pb")
        procs = {"pa": pa, "pb": pb}
        async with (
            client(mosquitto.port, affinity_timeout_s=1.0) as c,
            peer(mosquitto.port, ["maze/response/app"]) as p,
        ):
            first = await c.ask("maze", "turn 1", session="s5", systemPrompt=SYSTEM, request_id="t1")
            stuck = procs[first.raw["worker"]]
            stuck.send_signal(signal.SIGSTOP)  # paused: its status still says ready
            try:
                pending = asyncio.create_task(
                    c.ask("maze", "turn 2", session="s5", systemPrompt=SYSTEM, request_id="t2", timeout_s=30)
                )
                await asyncio.sleep(3)
            finally:
                stuck.send_signal(signal.SIGCONT)
            second = await pending
            third = await c.ask("maze", "turn 3", session="s5", systemPrompt=SYSTEM, request_id="t3")
            await asyncio.sleep(1)  # a late copy's final, if any, would arrive now
    assert c.fallbacks == 1
    assert second.ok
    assert third.ok
    finals = [b for b in bodies(p.received) if b.get("done")]
    assert {b["requestId"] for b in finals} == {"t1", "t2", "t3"}
    # the paused worker's late copy finds t2 answered: at most the same final again (docs/protocol.md 5)
    assert len({json.dumps(b, sort_keys=True) for b in finals if b["requestId"] == "t2"}) == 1
    assert third.text.count("turn 2") == 1  # recorded once, whichever worker answered


async def test_a_long_sticky_answer_is_not_mistaken_for_silence(mosquitto, redis_server):
    """The sticky worker acknowledges at once (`accepted`), so a slow answer causes no fallback resend."""
    state = {"url": redis_server.url}
    engine = FakeEngine(history_script, token_delay_s=0.05)
    async with (
        running_worker(engine, projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": "solo"}),
        client(mosquitto.port, affinity_timeout_s=0.3) as c,
        peer(mosquitto.port, ["maze/response/app"]) as p,
    ):
        await c.ask("maze", "first", session="long")
        long = " ".join(f"w{i}" for i in range(30))  # ~1.5 s of tokens, five times the fallback timeout
        reply = await c.ask("maze", long, session="long", request_id="slow")
    assert reply.ok
    assert c.fallbacks == 0
    accepted = [b for b in bodies(p.received) if b.get("requestId") == "slow" and b.get("event") == "accepted"]
    assert [(b["seq"], b["worker"]) for b in accepted] == [(0, "solo")]


@pytest.mark.parametrize("seed", [11, 12])
async def test_sticky_sessions_under_a_seeded_fault_schedule_lose_and_double_no_turn(mosquitto, redis_server, seed):
    """Sticky workers paused (SIGSTOP: status still `ready`) or restarted at random while sessions talk:
    every turn ends with one final reply, and each answer's history holds exactly the turns the client was
    told succeeded, once each, in order."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not a secret
    env = {
        "VLLM_WORKER_STATE__URL": redis_server.url,
        "VLLM_WORKER_STATE__LEASE_S": "2",
        "VLLM_WORKER_FAKE_SCRIPT": "history",
        "VLLM_WORKER_FAKE_PREFIX_CACHE": "1",
    }
    stacks = {w: contextlib.ExitStack() for w in ("fa", "fb")}
    procs = {w: stacks[w].enter_context(worker_subprocess(mosquitto.url, w, ["general"], **env)) for w in stacks}
    told_ok: dict[str, list[str]] = {}
    try:
        await wait_ready(mosquitto.port, *stacks)
        async with (
            client(mosquitto.port, affinity_timeout_s=1.0) as c,
            peer(mosquitto.port, ["general/response/app"]) as p,
        ):

            async def conversation(session: str) -> None:
                told_ok[session] = []
                for turn in range(1, 7):
                    text = f"{session} turn {turn}"
                    reply = await c.ask("general", text, session=session, request_id=f"{session}-{turn}", timeout_s=20)
                    if reply.ok:
                        assert reply.text == "history: " + " | ".join([*told_ok[session], text])
                        told_ok[session].append(text)
                    else:
                        assert reply.error_code in {"shutting_down", "state_unavailable", "overloaded"}, reply

            async def faults() -> None:
                for _ in range(5):
                    await asyncio.sleep(rng.uniform(0.3, 1.2))
                    victim = rng.choice(sorted(procs))
                    if rng.random() < 0.6:
                        procs[victim].send_signal(signal.SIGSTOP)
                        await asyncio.sleep(rng.uniform(0.5, 2.5))
                        procs[victim].send_signal(signal.SIGCONT)
                    else:
                        procs[victim].send_signal(signal.SIGTERM)
                        await asyncio.to_thread(procs[victim].wait, 30)
                        stacks[victim].close()
                        stacks[victim] = contextlib.ExitStack()
                        procs[victim] = stacks[victim].enter_context(
                            worker_subprocess(mosquitto.url, victim, ["general"], **env)
                        )
                        await wait_ready(mosquitto.port, victim)

            await asyncio.gather(*(conversation(f"z{seed}-{i}") for i in range(4)), faults())
            await asyncio.sleep(1)  # a late copy's final, if any, would arrive now
        finals: dict[str, set[str]] = {}
        for b in bodies(p.received):
            if b.get("done"):
                finals.setdefault(b["requestId"], set()).add(json.dumps(b, sort_keys=True))
        assert len(finals) == 24  # every turn got a final reply...
        assert all(len(v) == 1 for v in finals.values())  # ...one (a redelivered copy repeats it byte for byte)
        assert sum(len(v) for v in told_ok.values()) >= 12  # the schedule left most turns answered
    finally:
        for stack in stacks.values():
            stack.close()
