"""The state layer's contract, run over every backend (memory, and a real redis-server), plus what only
a shared backend promises: one budget, one claim and one lock across workers, leases that lapse when
their holder dies, and the degraded mode while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from support import RedisServer, free_port, until

from worker.errors import RateLimitedError, StateUnavailableError
from worker.protocol import FinalReply
from worker.state import Budget, Claim, MemoryState, State, Turn
from worker.state.memory import MemoryLimits
from worker.state.redis_backend import RedisState, redact

KEY = ("maze", "alice", "s1")
RID = ("maze", "alice", "r1")
FINAL = FinalReply("maze/response/alice", b'{"v":2,"done":true}', b"\x00corr")


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def redis_state(url: str, lease_s: float = 10.0, **limits: float) -> RedisState:
    namespace = f"test{time.monotonic_ns()}/"  # every test its own keys
    return RedisState(url, namespace, MemoryLimits(**limits), lease_s=lease_s, op_timeout_s=0.5)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def state(request) -> AsyncIterator[State]:
    store: State = (
        MemoryState() if request.param == "memory" else redis_state(request.getfixturevalue("redis_server").url)
    )
    async with store:
        yield store


# ---- the contract: every backend ------------------------------------------------------------------------
async def test_turns_are_appended_trimmed_by_tokens_and_reset(state):
    assert (await state.load(KEY)).turns == ()
    for i in range(5):
        await state.append(KEY, Turn(f"q{i}", f"a{i}", 4), None, max_tokens=9)
    history = await state.load(KEY)
    assert [t.user for t in history.turns] == ["q3", "q4"]  # 2 x 4 tokens fit in 9, the newest kept
    assert history.turns[-1] == Turn("q4", "a4", 4)
    assert await state.load(("maze", "bob", "s1")) == type(history)()  # another owner's session is apart
    assert await state.reset(KEY)
    assert not await state.reset(KEY)
    assert (await state.load(KEY)).turns == ()


async def test_a_system_prompt_override_is_kept_until_reset(state):
    await state.append(KEY, Turn("q", "a", 2), "You are a pirate.", max_tokens=100)
    await state.append(KEY, Turn("q2", "a2", 2), None, max_tokens=100)
    history = await state.load(KEY)
    assert history.system_prompt == "You are a pirate."
    assert len(history.turns) == 2
    await state.reset(KEY)
    assert (await state.load(KEY)).system_prompt is None


async def test_text_survives_exactly(state):
    text = 'quotes " \\ newlines \n\n unicode ✓ 漢字 {"json": [1]}'
    await state.append(KEY, Turn(text, text[::-1], 7), text, max_tokens=100)
    history = await state.load(KEY)
    assert history.turns == (Turn(text, text[::-1], 7),)
    assert history.system_prompt == text


async def test_the_session_lock_serves_one_holder_at_a_time_in_arrival_order(state):
    held: list[int] = []
    order: list[int] = []
    overlaps = 0

    async def turn(i: int) -> None:
        nonlocal overlaps
        async with state.lock(KEY):
            overlaps += bool(held)
            held.append(i)
            order.append(i)
            await asyncio.sleep(0.02)
            held.remove(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(turn(i)))
        await asyncio.sleep(0.01)  # arrive one after another
    await asyncio.gather(*tasks)
    assert overlaps == 0
    assert order == list(range(6))


async def test_other_sessions_do_not_wait_for_a_held_one(state):
    async with state.lock(KEY), asyncio.timeout(2), state.lock(("maze", "alice", "s2")):
        pass


async def test_a_cancelled_waiter_leaves_the_queue(state):
    async with state.lock(KEY):
        waiter = asyncio.create_task(_enter(state))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    async with asyncio.timeout(2), state.lock(KEY):  # nobody left holding it
        pass


async def _enter(state: State) -> None:
    async with state.lock(KEY):
        pass


async def test_a_request_id_is_claimed_once_then_answered_from_the_cache(state):
    assert (await state.claim(RID)).verdict is Claim.NEW
    assert (await state.claim(RID)).verdict is Claim.IN_FLIGHT
    await state.complete(RID, FINAL)
    again = await state.claim(RID)
    assert again.verdict is Claim.DONE
    assert again.final == FINAL
    other_owner = ("maze", "bob", "r1")
    assert (await state.claim(other_owner)).verdict is Claim.NEW  # requestIds live in their client's space


async def test_an_abandoned_claim_can_be_claimed_again(state):
    assert (await state.claim(RID)).verdict is Claim.NEW
    await state.abandon(RID)
    assert (await state.claim(RID)).verdict is Claim.NEW


async def test_a_bucket_grants_its_burst_then_refuses_with_a_retry_after(state):
    budget = [Budget(("maze", "alice"), rate_per_s=0.5, burst=3)]
    for _ in range(3):
        await state.take(budget)
    with pytest.raises(RateLimitedError) as refused:
        await state.take(budget)
    assert refused.value.retry_after_ms is not None
    assert 0 < refused.value.retry_after_ms <= 2000


async def test_a_refused_take_spends_no_token_from_any_bucket(state):
    client = Budget(("maze", "alice"), rate_per_s=0.01, burst=2)
    project = Budget(("maze", "*"), rate_per_s=0.01, burst=1)
    await state.take([client, project])
    with pytest.raises(RateLimitedError):
        await state.take([client, project])  # the project bucket is empty ...
    await state.take([client])  # ... and the client's second token was not spent by that refusal
    with pytest.raises(RateLimitedError):
        await state.take([client])


async def test_health_is_reported(state):
    health = state.health()
    assert health.backend == state.backend
    assert health.healthy
    assert not health.degraded


# ---- what only a shared backend promises -------------------------------------------------------------------
@pytest.fixture
async def two(redis_server) -> AsyncIterator[tuple[RedisState, RedisState]]:
    namespace = f"pair{time.monotonic_ns()}/"
    a = RedisState(redis_server.url, namespace, MemoryLimits(), lease_s=0.5, op_timeout_s=0.5)
    b = RedisState(redis_server.url, namespace, MemoryLimits(), lease_s=0.5, op_timeout_s=0.5)
    async with a, b:
        yield a, b


async def test_two_workers_share_one_budget_one_claim_and_one_history(two):
    a, b = two
    budget = [Budget(("maze", "alice"), rate_per_s=0.01, burst=4)]
    granted = 0
    for store in (a, b, a, b, a, b):
        with contextlib.suppress(RateLimitedError):
            await store.take(budget)
            granted += 1
    assert granted == 4
    assert (await a.claim(RID)).verdict is Claim.NEW
    assert (await b.claim(RID)).verdict is Claim.IN_FLIGHT
    await a.complete(RID, FINAL)
    assert (await b.claim(RID)).final == FINAL
    await a.append(KEY, Turn("q", "a", 2), None, 100)
    assert (await b.load(KEY)).turns == (Turn("q", "a", 2),)


async def test_a_live_holder_keeps_its_lock_past_the_lease(two):
    a, b = two
    renew = asyncio.create_task(a.monitor())
    try:
        async with a.lock(KEY):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5), b.lock(KEY):  # 3 leases long
                    pass
    finally:
        renew.cancel()
    async with asyncio.timeout(2), b.lock(KEY):
        pass


async def test_a_dead_holders_lock_and_claim_lapse_after_the_lease(two):
    a, b = two  # a's monitor never runs: a is a worker that died holding both
    lock = a.lock(KEY)
    await lock.__aenter__()
    assert (await a.claim(RID)).verdict is Claim.NEW
    started = time.monotonic()
    async with asyncio.timeout(5), b.lock(KEY):
        waited = time.monotonic() - started
    assert waited >= 0.3  # it did wait for the lease (0.5 s) ...
    assert (await b.claim(RID)).verdict is Claim.NEW  # ... and the claim lapsed with it


async def test_unreadable_items_in_redis_are_skipped_never_raised(redis_server, two):
    import redis.asyncio as aioredis

    a, _ = two
    await a.append(KEY, Turn("good", "turn", 2), None, 100)
    raw = aioredis.Redis.from_url(redis_server.url)
    turns_key = a._session(KEY, "t")
    await raw.rpush(turns_key, b"not a turn", b"12\n[1, 2]", b"\xff\xfe")
    await raw.set(a._request(RID), b"d:{broken json")
    await raw.aclose()
    assert (await a.load(KEY)).turns == (Turn("good", "turn", 2),)
    claimed = await a.claim(RID)
    assert claimed.verdict is Claim.DONE
    assert claimed.final is None


async def test_redis_away_fails_fast_then_recovers_by_itself():
    port = free_port()
    store = RedisState(f"redis://127.0.0.1:{port}/0", "away/", MemoryLimits(), lease_s=1.0, op_timeout_s=0.5)
    async with store:
        assert not store.health().healthy
        assert store.health().degraded
        started = time.monotonic()
        with pytest.raises(StateUnavailableError):
            await store.load(KEY)
        with pytest.raises(StateUnavailableError):
            async with store.lock(KEY):
                pass
        assert time.monotonic() - started < 0.5  # fails fast while down: no connect per request
        assert (await store.claim(RID)).verdict is Claim.NEW  # dedupe and rate limits: this worker's own
        assert (await store.claim(RID)).verdict is Claim.IN_FLIGHT
        await store.take([Budget(("maze", "alice"), 1.0, 1)])
        with pytest.raises(RateLimitedError):
            await store.take([Budget(("maze", "alice"), 1.0, 1)])
        server = RedisServer()
        server.port = port
        server.start()
        monitor = asyncio.create_task(store.monitor())
        try:
            await until(lambda: store.health().healthy, timeout_s=10)
            await store.append(KEY, Turn("back", "again", 2), None, 100)
            assert (await store.load(KEY)).turns == (Turn("back", "again", 2),)
            assert store.health().latency_ms is not None
        finally:
            monitor.cancel()
            server.stop()


async def test_a_password_protected_redis_works_and_a_wrong_password_is_logged_without_it(capsys):
    server = RedisServer(password="right-pw").start()
    try:
        good = RedisState(f"redis://:right-pw@127.0.0.1:{server.port}/0", "auth/", MemoryLimits(), op_timeout_s=0.5)
        async with good:
            await good.append(KEY, Turn("q", "a", 2), None, 100)
            assert good.health().healthy
        bad = RedisState(f"redis://:wrong-s3cret@127.0.0.1:{server.port}/0", "auth/", MemoryLimits(), op_timeout_s=0.5)
        async with bad:
            assert not bad.health().healthy
            with pytest.raises(StateUnavailableError):
                await bad.load(KEY)
    finally:
        server.stop()
    out = capsys.readouterr()
    logged = out.out + out.err
    assert "state.unavailable" in logged
    assert "wrong-s3cret" not in logged
    assert "right-pw" not in logged


def test_the_password_never_reaches_a_log_line():
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert "s3cret" not in redact("rediss://user:s3cret@host/1")
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
