"""Usage counters and daily quotas in memory (`worker.state.usage`): sums, bounds, days, refusals."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import QuotaExceededError
from worker.state import Counts, MemoryState, Quota, Usage
from worker.state.memory import MemoryLimits
from worker.state.usage import DAY_S, OTHER, PROJECT_WIDE, TOTAL, UsageBook, ms_to_midnight, utc_day

NOON = 1_796_817_600.0  # 2026-12-09 12:00:00 UTC


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spent(project: str, client: str, prompt: int = 10, completion: int = 5, **more: int) -> Usage:
    return Usage(project, client, Counts(requests=1, prompt_tokens=prompt, completion_tokens=completion, **more))


def test_utc_day_and_the_time_to_midnight():
    assert utc_day(NOON) == "2026-12-09"
    assert utc_day(NOON + 12 * 3600 - 0.001) == "2026-12-09"
    assert utc_day(NOON + 12 * 3600) == "2026-12-10"
    assert ms_to_midnight(NOON) == 12 * 3600 * 1000
    assert ms_to_midnight(NOON + 12 * 3600 - 0.0001) == 1  # never 0: a client must not retry in a loop


def test_counts_add_up_per_client_project_day_and_total():
    clock = Clock()
    book = UsageBook(max_clients=10, retention_days=35, clock=clock)
    book.add(spent("maze", "a", 10, 5))
    book.add(spent("maze", "a", 20, 7, cached_tokens=16))
    book.add(spent("maze", "b", 1, 1))
    clock.now += DAY_S
    book.add(spent("maze", "a", 3, 3))
    rows = {(r.day, r.client): r.counts for r in book.rows(days=2, project="maze")}
    assert rows[("2026-12-09", "a")] == Counts(2, 30, 12, 16)
    assert rows[("2026-12-09", PROJECT_WIDE)] == Counts(3, 31, 13, 16)
    assert rows[("2026-12-10", "a")] == Counts(1, 3, 3)
    assert rows[(TOTAL, PROJECT_WIDE)] == Counts(4, 34, 16, 16)
    assert book.rows(days=1)[0].day == "2026-12-10"  # newest first, totals last
    assert [r.day for r in book.rows(days=1)][-1] == TOTAL
    assert {(r.day, r.client) for r in book.rows(days=1, client="b")} == {
        ("2026-12-10", PROJECT_WIDE),
        (TOTAL, PROJECT_WIDE),
        (TOTAL, "b"),
    }  # b spent nothing today


def test_clients_past_the_bound_count_as_other_and_old_days_are_forgotten():
    clock = Clock()
    book = UsageBook(max_clients=3, retention_days=2, clock=clock)
    for i in range(10):
        book.add(spent("p", f"c{i}", 1, 0))
    today = {r.client: r.counts.requests for r in book.rows(days=1) if r.day != TOTAL}
    assert today == {PROJECT_WIDE: 10, "c0": 1, "c1": 1, "c2": 1, OTHER: 7}
    clock.now += 2 * DAY_S
    book.add(spent("p", "late", 1, 0))
    assert {r.day for r in book.rows(days=35)} == {"2026-12-11", TOTAL}  # 2026-12-09 is past the retention


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["p", "q"]), st.integers(0, 12), st.integers(0, 50), st.integers(0, 3)),
        max_size=80,
    ),
    st.integers(1, 6),
)
def test_the_project_line_always_equals_the_sum_of_its_clients_and_the_bound_holds(events, max_clients):
    clock = Clock()
    book = UsageBook(max_clients=max_clients, retention_days=35, clock=clock)
    for project, client, tokens, days_later in events:
        clock.now = NOON + days_later * DAY_S
        book.add(spent(project, f"c{client}", tokens, 1))
    clock.now = NOON + 3 * DAY_S
    by_scope: dict[tuple[str, str], list[tuple[str, Counts]]] = {}
    for r in book.rows(days=4):
        by_scope.setdefault((r.day, r.project), []).append((r.client, r.counts))
    for rows in by_scope.values():
        whole = dict(rows).pop(PROJECT_WIDE)
        clients = [c for name, c in rows if name != PROJECT_WIDE]
        assert sum(clients, Counts()) == whole
        assert len([name for name, _ in rows if name not in {PROJECT_WIDE, OTHER}]) <= max_clients
    assert sum((r.counts for r in book.rows(days=4) if r.day == TOTAL and r.client == PROJECT_WIDE), Counts()) == sum(
        (Counts(1, tokens, 1) for _, _, tokens, _ in events), Counts()
    )


def test_a_client_quota_admits_until_crossed_then_refuses_until_midnight():
    clock = Clock()
    state = MemoryState(MemoryLimits(), wall=clock)
    quota = Quota(("maze", "robot"), tokens=100)

    async def scenario() -> None:
        await state.take([], [quota])
        state.record_usage(spent("maze", "robot", 60, 30))  # 90: still under
        await state.take([], [quota])
        state.record_usage(spent("maze", "robot", 10, 5))  # 105: crossed
        with pytest.raises(QuotaExceededError) as refused:
            await state.take([], [quota])
        assert refused.value.retry_after_ms == 12 * 3600 * 1000
        await state.take([], [Quota(("maze", "other-robot"), tokens=100)])  # another client is not affected
        clock.now += 12 * 3600  # midnight: a new day's budget
        await state.take([], [quota])

    asyncio.run(scenario())


def test_a_project_quota_holds_across_clients():
    state = MemoryState(MemoryLimits(), wall=Clock())
    whole = Quota(("maze", PROJECT_WIDE), tokens=50)

    async def scenario() -> None:
        for client in ("a", "b", "c"):  # 20 tokens each: 60 after the third
            await state.take([], [whole])
            state.record_usage(spent("maze", client, 10, 10))
        with pytest.raises(QuotaExceededError, match="project"):
            await state.take([], [whole])
        with pytest.raises(QuotaExceededError, match="project"):
            await state.take([], [Quota(("maze", "d")), whole])  # a new client too

    asyncio.run(scenario())


def test_a_request_quota_counts_requests_that_ran_not_refusals():
    state = MemoryState(MemoryLimits(), wall=Clock())
    per_client = Quota(("maze", "a"), requests=2)

    async def scenario() -> None:
        state.record_usage(spent("maze", "a"))
        await state.take([], [per_client])
        state.record_usage(Usage("maze", "a", Counts(refused=1)))
        await state.take([], [per_client])  # a refusal does not use the request budget
        state.record_usage(spent("maze", "a"))
        with pytest.raises(QuotaExceededError, match="client"):
            await state.take([], [per_client])

    asyncio.run(scenario())
