"""Every bound of the state layer holds on every backend: cached replies by count and by bytes (a reply
carries the client's correlation data, so a count alone does not bound memory), sessions by count; on
Redis per project for the whole fleet. A running claim and a session mid-turn are never evicted.

Memory and a real redis-server; counts on Redis are read with SCAN, not through the code under test."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import RedisServer

from worker.protocol import FinalReply
from worker.state import Claim, MemoryState, State, Turn
from worker.state.memory import MemoryLimits, cached_bytes
from worker.state.redis_backend import RedisState

KIB = 1024
MIB = 1024 * KIB
BIG_CORRELATION = b"\xab" * (64 * KIB)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def final(i: int, correlation: bytes | None = b"corr") -> FinalReply:
    return FinalReply("maze/response/alice", b'{"v":2,"done":true,"n":%d}' % i, correlation)


def rid(i: int | str) -> tuple[str, str, str]:
    return ("maze", "alice", f"r{i}")


def make(kind: str, url: str | None, limits: MemoryLimits) -> MemoryState | RedisState:
    if kind == "memory":
        return MemoryState(limits)
    assert url is not None
    return RedisState(url, f"bounds{time.monotonic_ns()}/", limits, lease_s=60.0, op_timeout_s=2.0)


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def open_store(backend, request):
    """`open_store(limits)` -> the backend under test with those limits (the test enters it)."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    return lambda limits: make(backend, url, limits)


async def raw_values(store: RedisState, pattern: str) -> dict[bytes, bytes]:
    """Key -> value of every string key of the store's namespace matching `pattern` (SCAN: no KEYS)."""
    assert store._r is not None
    found: dict[bytes, bytes] = {}
    async for key in store._r.scan_iter(match=f"{store._ns}{pattern}", count=1000):
        value = await store._r.get(key)
        if value is not None:
            found[key] = value
    return found


async def cached_on_redis(store: RedisState) -> tuple[int, int]:
    """(answered requestId keys, their bytes as stored: key + value), read straight from Redis."""
    values = await raw_values(store, "maze/r/*")
    done = {k: v for k, v in values.items() if v.startswith(b"d:")}
    return len(done), sum(len(k) + len(v) for k, v in done.items())


async def answered(store: State, keys: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The keys the store still answers from its cache (claims the others: call it last)."""
    return [key for key in keys if (await store.claim(key)).verdict is Claim.DONE]


async def fill(store: State, count: int, correlation: bytes | None = b"corr", start: int = 0) -> None:
    for i in range(start, start + count):
        assert (await store.claim(rid(i))).verdict is Claim.NEW
        await store.complete(rid(i), final(i, correlation))


# ---- (a) the entry bound ------------------------------------------------------------------------------
async def test_a_thousand_answers_leave_at_most_the_entry_bound(open_store, backend):
    store = open_store(MemoryLimits(dedupe_max_entries=200))
    async with store:
        await fill(store, 1000)
        if isinstance(store, RedisState):
            entries, _ = await cached_on_redis(store)
            assert entries == 200  # on the server: the bound, not one key per request ever answered
        kept = await answered(store, [rid(i) for i in range(1000)])
    assert kept == [rid(i) for i in range(800, 1000)]  # the newest 200; an older retry is generated again


# ---- (b) the byte bound --------------------------------------------------------------------------------
async def test_replies_with_64_kib_of_correlation_data_are_capped_by_bytes(open_store, backend):
    store = open_store(MemoryLimits(dedupe_max_bytes=1 * MIB))
    async with store:
        await fill(store, 100, BIG_CORRELATION)
        if isinstance(store, RedisState):
            entries, stored = await cached_on_redis(store)
            assert stored <= 1 * MIB
            assert 1 <= entries <= 16
        kept = await answered(store, [rid(i) for i in range(100)])
    assert 1 <= len(kept) <= 16  # 64 KiB each in 1 MiB (on Redis base64 makes each ~87 KiB: 11)
    assert kept == [rid(i) for i in range(100 - len(kept), 100)]  # the newest ones
    assert sum(cached_bytes(k, final(int(k[2][1:]), BIG_CORRELATION)) for k in kept) <= 1 * MIB


async def test_a_reply_larger_than_the_byte_bound_is_not_cached(open_store):
    store = open_store(MemoryLimits(dedupe_max_bytes=32 * KIB))
    async with store:
        await fill(store, 3)
        await fill(store, 1, BIG_CORRELATION, start=3)
        assert (await store.claim(rid(3))).verdict is Claim.NEW  # generated again on a retry
        assert await answered(store, [rid(i) for i in range(3)]) == [rid(i) for i in range(3)]


# ---- (c) a running claim is never evicted ---------------------------------------------------------------
async def test_a_claim_in_flight_survives_a_flood_of_answers_past_every_bound(open_store, backend):
    store = open_store(MemoryLimits(dedupe_max_entries=200, dedupe_max_bytes=1 * MIB))
    async with store:
        assert (await store.claim(rid("held"))).verdict is Claim.NEW  # the oldest of all
        await fill(store, 1000, b"\x01" * (8 * KIB))
        if isinstance(store, RedisState):
            entries, stored = await cached_on_redis(store)
            assert entries <= 200
            assert stored <= 1 * MIB
            claims = await raw_values(store, "maze/r/alice/rheld")
            assert next(iter(claims.values())).startswith(b"c:")  # still this worker's claim
        assert (await store.claim(rid("held"))).verdict is Claim.IN_FLIGHT  # a retry waits, not runs
        await store.complete(rid("held"), final(-1))
        again = await store.claim(rid("held"))
        assert again.verdict is Claim.DONE
        assert again.final == final(-1)


# ---- (d) the session bound -----------------------------------------------------------------------------
def skey(i: int | str) -> tuple[str, str, str]:
    return ("maze", "alice", f"s{i}")


async def test_a_thousand_sessions_leave_at_most_max_sessions(open_store, backend):
    store = open_store(MemoryLimits(max_sessions=200))
    async with store:
        for i in range(1000):
            await store.append(skey(i), Turn(f"q{i}", f"a{i}", 2), "be brief" if i % 2 else None, 100)
        if isinstance(store, RedisState):
            assert await count_keys(store, "maze/s/*/t") == 200
            assert await count_keys(store, "maze/s/*/p") == 100  # overrides go with their session
        else:
            assert store.sessions("maze") == 200
        assert (await store.load(skey(999))).turns == (Turn("q999", "a999", 2),)
        assert (await store.load(skey(0))).turns == ()  # the least recently used was forgotten


async def test_a_session_mid_turn_is_never_evicted_and_does_not_lift_the_cap(open_store, backend):
    store = open_store(MemoryLimits(max_sessions=50))
    async with store:
        await store.append(skey("held"), Turn("q", "a", 2), None, 100)  # the least recently used
        async with store.lock(skey("held")):
            for i in range(300):
                await store.append(skey(i), Turn(f"q{i}", f"a{i}", 2), None, 100)
            if isinstance(store, RedisState):
                assert await count_keys(store, "maze/s/*/t") <= 51
            else:
                assert (store.sessions("maze") or 0) <= 51
            assert (await store.load(skey("held"))).turns == (Turn("q", "a", 2),)
            assert (await store.load(skey(0))).turns == ()


async def count_keys(store: RedisState, pattern: str) -> int:
    assert store._r is not None
    return len([k async for k in store._r.scan_iter(match=f"{store._ns}{pattern}", count=1000)])


# ---- every key keeps a TTL; the bounds are per project ------------------------------------------------
async def test_every_redis_key_has_a_ttl_and_each_project_has_its_own_bound(redis_server):
    store = make("redis", redis_server.url, MemoryLimits(dedupe_max_entries=5, max_sessions=5))
    assert isinstance(store, RedisState)
    async with store:
        for project in ("maze", "driving"):
            for i in range(20):
                key = (project, "alice", f"r{i}")
                assert (await store.claim(key)).verdict is Claim.NEW
                await store.complete(key, final(i))
                await store.append((project, "alice", f"s{i}"), Turn("q", "a", 2), "sys", 100)
        assert store._r is not None
        keys = [k async for k in store._r.scan_iter(match=f"{store._ns}*", count=1000)]
        ttls = {k: await store._r.pttl(k) for k in keys}
        assert all(ttl > 0 for ttl in ttls.values()), {k: t for k, t in ttls.items() if t <= 0}
        for project in ("maze", "driving"):
            assert await count_keys(store, f"{project}/r/*") == 5
            assert await count_keys(store, f"{project}/s/*/t") == 5


# ---- (e) generated sequences of claim / complete / abandon ----------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "complete", "abandon"]),
        st.integers(0, 11),
        st.integers(0, 24 * KIB),
    ),
    max_size=40,
)
LIMITS = st.builds(
    MemoryLimits,
    dedupe_max_entries=st.integers(1, 6),
    dedupe_max_bytes=st.integers(1, 64 * KIB),
)


async def run_ops(store: MemoryState | RedisState, limits: MemoryLimits, ops: list[tuple[str, int, int]]) -> None:
    """Apply `ops` as a worker would (complete/abandon only its own claims); check the bounds after each."""
    mine: set[int] = set()
    for op, i, size in ops:
        if op == "claim":
            verdict = (await store.claim(rid(i))).verdict
            assert verdict is not Claim.NEW or i not in mine
            if verdict is Claim.NEW:
                mine.add(i)
        elif i in mine:
            mine.discard(i)
            if op == "complete":
                await store.complete(rid(i), final(i, b"\x00" * size))
            else:
                await store.abandon(rid(i))
        if isinstance(store, RedisState):
            entries, used = await cached_on_redis(store)
            claims = await raw_values(store, "maze/r/*")
            assert {int(k.rsplit(b"/r", 1)[1]) for k, v in claims.items() if v.startswith(b"c:")} == mine
        else:
            entries, used = store.dedupe_usage()
            assert store._done_bytes == used  # the running total never drifts
        assert entries <= limits.dedupe_max_entries
        assert used <= limits.dedupe_max_bytes
        for held in mine:  # every claim still running is still known as running
            assert (await store.claim(rid(held))).verdict is Claim.IN_FLIGHT


@settings(max_examples=150, derandomize=True, deadline=None)
@given(limits=LIMITS, ops=OPS)
def test_generated_sequences_keep_both_bounds_and_every_running_claim_in_memory(limits, ops):
    async def scenario() -> None:
        async with MemoryState(limits) as store:
            await run_ops(store, limits, ops)

    asyncio.run(scenario())


@settings(max_examples=40, derandomize=True, deadline=None)
@given(limits=LIMITS, ops=OPS)
def test_generated_sequences_keep_both_bounds_and_every_running_claim_on_redis(redis_server, limits, ops):
    async def scenario() -> None:
        store = make("redis", redis_server.url, limits)
        async with store:
            await run_ops(store, limits, ops)
            assert isinstance(store, RedisState)
            await drop_namespace(store)

    asyncio.run(scenario())


async def drop_namespace(store: RedisState) -> None:
    """Leave the shared server as found (each example has its own namespace)."""
    assert store._r is not None
    keys = [k async for k in store._r.scan_iter(match=f"{store._ns}*", count=1000)]
    if keys:
        await store._r.delete(*keys)
