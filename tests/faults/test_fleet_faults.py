"""Issue 27's reproductions: compound faults that broke a fleet guarantee, each on a real Mosquitto + Redis.

- A Redis stall while a turn is recorded: a turn the client was told failed must never land in the
  history, a turn recorded must be answered, a retry must be recorded once, and the lock must come back.
- A paused holder whose lease lapsed: it records nothing and publishes no second final (fencing).
- One requestId on two workers, one cancel: one `cancelled`.
The fake engine answers `history: u1 | u2 | ...`, the user turns its prompt held (the chaos checker's oracle).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from support import Mosquitto, Peer, RedisServer, bodies, peer, running_worker, wait_ready, worker_subprocess

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine
from worker.errors import StateUnavailableError
from worker.protocol import FinalReply
from worker.state import Turn
from worker.state.base import Claim
from worker.state.memory import MemoryLimits
from worker.state.redis_backend import RedisState

pytestmark = pytest.mark.faults
LONG = " ".join(f"w{i}" for i in range(40))  # 40 words: ~2 s of generation at 0.05 s a token


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto("persistence true\npersistence_location {dir}/\n").start()
    yield broker
    broker.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


def history_script(prompt) -> str:
    """What the engine saw of the session: every user message of the prompt, oldest first."""
    return "history: " + " | ".join(m.content for m in prompt.messages if m.role == "user")


def seen(text: str) -> list[str]:
    assert text.startswith("history: "), text
    return text.removeprefix("history: ").split(" | ")


async def stall(redis: RedisServer, for_s: float, started: asyncio.Event) -> None:
    """SIGSTOP Redis once the turn generates (its first streamed chunk), for `for_s`: it records meanwhile."""
    assert redis.proc is not None
    await started.wait()
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(for_s)
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


async def ask(c: Client, text: str, rid: str, started: asyncio.Event | None = None) -> tuple[str, str]:
    """(error code or "ok", text) of one turn of session s; `started` is set at its first streamed chunk."""
    reply = None
    async for chunk in c.stream("maze", text, session="s", request_id=rid, timeout_s=60, maxTokens=400):
        if started is not None:
            started.set()
        reply = chunk.reply
    assert reply is not None
    return (reply.error_code or "ok"), reply.text


@pytest.fixture
async def worker_and_client(mosquitto, redis_server, request) -> AsyncIterator[Client]:
    lease_s, op_timeout_s = request.param
    engine = FakeEngine(history_script, token_delay_s=0.05)
    state = {"url": redis_server.url, "lease_s": lease_s, "op_timeout_s": op_timeout_s}
    async with (
        running_worker(engine, projects=["maze"], broker_url=mosquitto.url, state=state),
        Client(BrokerConfig(url=mosquitto.url), client_id="app") as c,
    ):
        yield c


@pytest.mark.parametrize("worker_and_client", [(10.0, 1.0)], indirect=True)
async def test_a_turn_recorded_during_a_redis_stall_is_answered_once_and_the_lock_comes_back(
    worker_and_client, redis_server
):
    c = worker_and_client
    assert await ask(c, "t1", "r1") == ("ok", "history: t1")
    generating = asyncio.Event()
    stalled = asyncio.create_task(stall(redis_server, 4.0, generating))  # turn 2 records while Redis is stopped
    code, text = await ask(c, f"t2 {LONG}", "r2", generating)
    await stalled
    assert code == "ok"  # the write landed once Redis was back: the answer says so
    assert seen(text) == ["t1", f"t2 {LONG}"]
    assert await ask(c, "t3", "r3") == ("ok", f"history: t1 | t2 {LONG} | t3")  # exactly once, in order
    assert await ask(c, f"t2 {LONG}", "r2") == ("ok", text)  # a retry: the same answer, nothing recorded again
    assert await ask(c, "t4", "r4") == ("ok", f"history: t1 | t2 {LONG} | t3 | t4")


@pytest.mark.parametrize("worker_and_client", [(1.5, 0.5)], indirect=True)
async def test_a_turn_told_failed_during_a_long_redis_stall_never_lands_and_its_retry_records_once(
    worker_and_client, redis_server
):
    c = worker_and_client
    assert await ask(c, "t1", "r1") == ("ok", "history: t1")
    generating = asyncio.Event()
    stalled = asyncio.create_task(stall(redis_server, 6.0, generating))  # past lease_s: the turn fails
    code, _ = await ask(c, f"t2 {LONG}", "r2", generating)
    assert code == "state_unavailable"
    await stalled  # the write sent before the stall now runs on the server: refused (its deadline passed)
    started = time.monotonic()
    while (turn3 := await ask(c, "t3", "r3"))[0] == "state_unavailable":  # until the worker sees Redis back
        assert time.monotonic() - started < 10, "the worker never saw Redis come back"
        await asyncio.sleep(0.2)
    assert turn3 == ("ok", "history: t1 | t3")  # no ghost turn
    print(f"turn 3 answered {time.monotonic() - started:.2f} s after Redis came back")
    code, text = await ask(c, f"t2 {LONG}", "r2")  # the retry the error invites
    assert (code, seen(text)) == ("ok", ["t1", "t3", f"t2 {LONG}"])
    assert await ask(c, "t4", "r4") == ("ok", f"history: t1 | t3 | t2 {LONG} | t4")  # recorded once


async def test_a_lock_whose_release_failed_is_given_back_once_redis_answers(redis_server):
    """A stall outlasting the release: the session's next turn goes on when Redis is back, not `lease_s` later."""
    key = ("maze", "app", "s")
    async with RedisState(redis_server.url, "vw/", MemoryLimits(), lease_s=30, op_timeout_s=0.3) as state:
        renew = asyncio.create_task(state.monitor())
        try:
            assert redis_server.proc is not None
            async with state.lock(key):
                os.kill(redis_server.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(1.0)  # the release failed meanwhile
            os.kill(redis_server.proc.pid, signal.SIGCONT)
            started = time.monotonic()
            async with asyncio.timeout(10):  # lease_s is 30: only the late release lets the next turn in
                while True:
                    try:
                        async with state.lock(key):
                            break
                    except StateUnavailableError:  # until the worker sees Redis back (as a client retries)
                        await asyncio.sleep(0.1)
            print(f"the next turn got the lock {time.monotonic() - started:.2f} s after Redis came back")
        finally:
            renew.cancel()


async def test_a_write_sent_before_a_stall_cannot_land_after_its_turn_was_reported_failed(redis_server):
    """The class behind the ghost turn, at the state layer: an append whose reply never came (Redis stopped)
    is reported failed only once it can no longer run; when Redis resumes, the queued write is refused."""
    key = ("maze", "app", "s")
    async with RedisState(redis_server.url, "vw/", MemoryLimits(), lease_s=10, op_timeout_s=0.3) as state:
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # no monitor runs: nothing flips the backend back up
        try:
            started = time.monotonic()
            with pytest.raises(StateUnavailableError):
                await state.append(key, Turn("t2", "a2", 2, "r2"), None, 1000)
            print(f"reported failed after {time.monotonic() - started:.2f} s")
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
    await asyncio.sleep(0.5)  # the queued write runs now
    async with RedisState(redis_server.url, "vw/", MemoryLimits()) as fresh:
        assert (await fresh.load(key)).turns == ()


async def test_a_holder_whose_lease_lapsed_records_nothing_and_its_claim_passes(redis_server):
    """A worker paused past lease_s (SIGSTOP) resumes as a former holder: fenced out of the session and the
    requestId. Two RedisState instances stand for the two workers; the paused one simply stops renewing."""
    limits = MemoryLimits()
    key, rid = ("maze", "app", "s"), ("maze", "app", "r2")
    final = FinalReply("maze/response/app", b'{"done":true}', None)
    async with (
        RedisState(redis_server.url, "vw/", limits, lease_s=0.5) as paused,
        RedisState(redis_server.url, "vw/", limits, lease_s=0.5) as other,
    ):
        renew = asyncio.create_task(other.monitor())
        try:
            assert (await paused.claim(rid)).verdict is Claim.NEW
            lock = paused.lock(key)
            fence = await lock.__aenter__()
            await asyncio.sleep(1.0)  # paused: no renewals, its leases lapse
            async with asyncio.timeout(5), other.lock(key) as other_fence:  # the next turn proceeds elsewhere
                await other.append(key, Turn("t3", "a3", 2, "r3"), None, 1000, other_fence)
            assert (await other.claim(rid)).verdict is Claim.NEW  # a client's retry of r2, elsewhere
            assert await other.complete(rid, final)
            with pytest.raises(StateUnavailableError):  # the resumed holder: fenced out
                await paused.append(key, Turn("t2", "a2", 2, "r2"), None, 1000, fence)
            assert not await paused.complete(rid, final)  # its final reply must not go out
            await lock.__aexit__(None, None, None)
            history = await other.load(key)
            assert [t.user for t in history.turns] == ["t3"]
        finally:
            renew.cancel()


@contextlib.asynccontextmanager
async def two_workers(
    mosquitto: Mosquitto, redis_server: RedisServer, token_delay_s: float = 0.1
) -> AsyncIterator[tuple[list[FakeEngine], Peer]]:
    """Workers wa and wb in one share group on Mosquitto + Redis (history oracle), and a peer reading app's replies."""
    engines = [FakeEngine(history_script, token_delay_s=token_delay_s) for _ in range(2)]
    state = {"url": redis_server.url, "lease_s": 3.0}
    async with (
        running_worker(engines[0], projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": "wa"}),
        running_worker(engines[1], projects=["maze"], broker_url=mosquitto.url, state=state, worker={"id": "wb"}),
        peer(mosquitto.port, ["maze/response/app"], protocol="5") as p,
    ):
        yield engines, p


async def test_one_cancel_of_a_request_held_by_two_workers_is_answered_once(mosquitto, redis_server):
    async with two_workers(mosquitto, redis_server) as (engines, p):
        body = {"v": 2, "clientId": "app", "sessionId": "s", "requestId": "dup", "message": LONG, "maxTokens": 400}
        for _ in range(2):  # a retry while the first copy runs: the share group hands it to the other worker
            await p.publish("maze/user_input", body)
        await asyncio.sleep(0.5)  # both copies taken: one generates, one waits on the claim
        assert sum(e.running for e in engines) == 1
        await p.publish("maze/cancel", {"requestId": "dup", "clientId": "app"})
        await p.wait_for(lambda got: any(b.get("done") for b in bodies(got)), timeout_s=10)
        await asyncio.sleep(1.0)  # anything else on its way arrives
    finals = [b for b in bodies(p.received) if b.get("done")]
    assert [b.get("error", {}).get("code") for b in finals] == ["cancelled"]


async def test_a_dead_workers_queued_share_is_served_by_the_others_within_the_takeover_bound(
    mosquitto, redis_server, tmp_path
):
    """Mosquitto keeps a SIGKILLed worker's place in the share group: its share queues for session_expiry_s.
    A live worker takes the dead one's session over after `takeover_after_s` (2 s here), serves the queue
    and ends the session; then every request is answered, v2 and classic."""
    env = {
        "VLLM_WORKER_STATE__URL": redis_server.url,
        "VLLM_WORKER_STATE__LEASE_S": "1.5",
        "VLLM_WORKER_WORKER__TAKEOVER_AFTER_S": "2",
    }
    logs = {w: tmp_path / f"{w}.log" for w in ("alive", "dead")}
    with (
        worker_subprocess(mosquitto.url, "alive", ["maze"], log_path=logs["alive"], **env) as alive,
        worker_subprocess(mosquitto.url, "dead", ["maze"], log_path=logs["dead"], **env) as dead,
    ):
        await wait_ready(mosquitto.port, "alive", "dead")
        dead.kill()
        dead.wait(10)
        killed = time.monotonic()
        async with (
            Client(BrokerConfig(url=mosquitto.url), client_id="app") as c,
            peer(mosquitto.port, ["maze/assistant_response/+"], client_id="classic", protocol="5") as p,
        ):
            v2 = [
                c.ask("maze", f"q{i}", session=f"s{i}", request_id=f"r{i}", timeout_s=60, retries=0) for i in range(20)
            ]
            for i in range(4):
                await p.publish("maze/user_input", {"message": f"classic {i}", "sessionId": f"k{i}"})
            replies = await asyncio.gather(*v2)
            await p.wait_for(lambda got: len(got) >= 4, timeout_s=60)
            served_s = time.monotonic() - killed
        deadline = time.monotonic() + 15  # the session ends once its queue was quiet for a moment
        while "takeover.done" not in logs["alive"].read_text():
            assert time.monotonic() < deadline, logs["alive"].read_text()[-3000:]
            await asyncio.sleep(0.2)
        async with Client(BrokerConfig(url=mosquitto.url), client_id="app2") as c:  # the group forgot the dead one
            after = [c.ask("maze", f"a{i}", session=f"a{i}", timeout_s=10, retries=0) for i in range(10)]
            assert [r.error_code for r in await asyncio.gather(*after)] == [None] * 10
        assert alive.poll() is None
    assert [r.error_code for r in replies] == [None] * 20
    assert sorted(m.topic for m in p.received) == [f"maze/assistant_response/k{i}" for i in range(4)]
    assert "request.unroutable" not in logs["alive"].read_text()
    print(f"every request answered {served_s:.1f} s after the SIGKILL (takeover after 2 s)")


async def test_a_copy_waiting_on_the_claim_whose_deadline_passes_answers_nothing(mosquitto, redis_server):
    async with two_workers(mosquitto, redis_server) as (_, p):
        body = {"v": 2, "clientId": "app", "sessionId": "s", "requestId": "late", "message": LONG, "deadlineMs": 1500}
        for _ in range(2):  # both copies run out of time: the holder while generating, the other while waiting
            await p.publish("maze/user_input", body)
        await p.wait_for(lambda got: any(b.get("done") for b in bodies(got)), timeout_s=10)
        await asyncio.sleep(1.5)  # anything else on its way arrives
    finals = [b for b in bodies(p.received) if b.get("done")]
    assert [b.get("error", {}).get("code") for b in finals] == ["expired"]


async def test_a_reset_is_applied_and_confirmed_once_and_a_late_copy_wipes_nothing(mosquitto, redis_server):
    async with (
        two_workers(mosquitto, redis_server, token_delay_s=0.0) as (_, p),
        Client(BrokerConfig(url=mosquitto.url), client_id="app") as c,
    ):
        assert await ask(c, "t1", "r1") == ("ok", "history: t1")
        reset = {"v": 2, "clientId": "app", "sessionId": "s", "requestId": "reset-1"}
        await p.publish("maze/session/reset", reset)  # every worker receives it
        await p.wait_for(lambda got: any(b.get("reset") for b in bodies(got)))
        assert await ask(c, "t2", "r2") == ("ok", "history: t2")
        await p.publish("maze/session/reset", reset)  # a late copy (queued for a paused worker, redelivered)
        await asyncio.sleep(0.5)
        assert await ask(c, "t3", "r3") == ("ok", "history: t2 | t3")  # nothing wiped
    assert sum(1 for b in bodies(p.received) if b.get("reset")) == 1  # confirmed once, by one worker
