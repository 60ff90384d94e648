"""Usage accounting and daily quotas: what each project and client spent, per UTC day (issue 31).

Every finished request adds one `Usage` (tokens, requests, errors, refusals) under its project and its
client (the v2 clientId, else the classic sessionId: the same key as rate limits), for the UTC day and
for a running total. `UsageBook` keeps them in this process (the memory backend, and the Redis one's
fallback view); `state/redis_usage.py` keeps them fleet-wide. Both bound what they keep: at most
`max_clients` clients per project and day (the rest count as `OTHER`), and `retention_days` days.

A `Quota` is checked before a request runs: a client or project whose tokens (prompt + completion) or
requests today reached the limit is refused with `quota_exceeded` until the next UTC midnight. Requests
already running finish and are counted, so a budget can be overshot by what was in flight.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.errors import QuotaExceededError

DAY_S = 86_400
PROJECT_WIDE = "*"
"""The client key of a project's own totals (never a client id: ids have no `*`)."""
OTHER = "(other)"
"""Where the clients past `max_clients` of a project and day count (never a client id: ids have no `(`)."""
TOTAL = "total"
"""The day key of the running totals (since the counters began, kept while used within the retention)."""
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors", "refused")


@dataclass(frozen=True, slots=True)
class Counts:
    """What a project or client spent: requests that ran, their tokens, and how many failed or were refused."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    errors: int = 0
    """Requests that ran and ended with an error reply (cancelled, expired, engine_error, ...)."""
    refused: int = 0
    """Requests refused by a rate limit or a quota before they ran (not in `requests`)."""

    @property
    def tokens(self) -> int:
        """What quotas count: prompt + completion tokens (cached prompt tokens included: they hold KV)."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f) + getattr(other, f) for f in FIELDS))

    def as_dict(self) -> dict[str, int]:
        """Field name -> value."""
        return {f: getattr(self, f) for f in FIELDS}


@dataclass(frozen=True, slots=True)
class Usage:
    """One finished request's counts, under its project and client."""

    project: str
    client: str
    counts: Counts


@dataclass(frozen=True, slots=True)
class Quota:
    """A daily budget for `key` = (project, client) or (project, `PROJECT_WIDE`); None is unlimited."""

    key: tuple[str, str]
    tokens: int | None = None
    requests: int | None = None

    def exceeded_by(self, used: Counts) -> bool:
        """Whether today's counts reached the budget (a request is admitted while under it)."""
        over_tokens = self.tokens is not None and used.tokens >= self.tokens
        return over_tokens or (self.requests is not None and used.requests >= self.requests)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of `vllm-worker usage`: a day (or `TOTAL`), a project, a client (or `PROJECT_WIDE`)."""

    day: str
    project: str
    client: str
    counts: Counts


def wall_clock() -> float:
    """Now, for UTC days (looked up at each call: tests replace it to cross midnight without waiting)."""
    return time.time()


def utc_day(epoch_s: float) -> str:
    """The UTC day of a time, `YYYY-MM-DD` (the key counters are kept under)."""
    return _day_name(int(epoch_s // DAY_S))


@functools.lru_cache(maxsize=64)
def _day_name(day_number: int) -> str:
    """Formatting a date costs microseconds, and every request needs today's: one per day."""
    return datetime.fromtimestamp(day_number * DAY_S, UTC).strftime("%Y-%m-%d")


def ms_to_midnight(epoch_s: float) -> int:
    """Milliseconds until the next UTC midnight (when daily quotas reset): at least 1."""
    return max(1, math.ceil((DAY_S - epoch_s % DAY_S) * 1000))


def quota_error(quota: Quota, retry_after_ms: int) -> QuotaExceededError:
    """The refusal for an exhausted quota, retryable at the next UTC midnight (`retry_after_ms` from now)."""
    who = "the project" if quota.key[1] == PROJECT_WIDE else "this client"
    return QuotaExceededError(f"{who} used its daily budget", retry_after_ms=retry_after_ms)


class UsageBook:
    """Counters in this process, per (project, day) and client; bounded in clients and days."""

    def __init__(self, max_clients: int, retention_days: int, clock: Callable[[], float] | None = None) -> None:
        self._max_clients = max_clients
        self._retention_days = retention_days
        self._clock = clock or (lambda: wall_clock())  # noqa: PLW0108 - looked up per call: tests replace it
        self._days: dict[tuple[str, str], dict[str, Counts]] = {}
        self._pruned_on = ""

    def add(self, usage: Usage, day: str | None = None) -> None:
        """Count one request (today by this process' clock unless `day` says)."""
        day = day or utc_day(self._clock())
        for scope in (day, TOTAL):
            clients = self._days.setdefault((usage.project, scope), {})
            who = self._who(clients, usage.client)
            for key in (who, PROJECT_WIDE):
                clients[key] = clients.get(key, Counts()) + usage.counts
        self._forget_old()

    def used_today(self, key: tuple[str, str]) -> Counts:
        """What (project, client) spent today (a client past the bound reads as `OTHER`)."""
        clients = self._days.get((key[0], utc_day(self._clock())), {})
        return clients.get(self._who(clients, key[1]), Counts())

    def _who(self, clients: dict[str, Counts], client: str) -> str:
        """The key `client` counts under: itself, or `OTHER` once the day holds `max_clients` others."""
        if client in clients or client == PROJECT_WIDE:
            return client
        named = len(clients) - (PROJECT_WIDE in clients) - (OTHER in clients)
        return OTHER if named >= self._max_clients else client

    def total(self, project: str) -> Counts:
        """What `project` spent since these counters began (in a worker: since it started)."""
        return self._days.get((project, TOTAL), {}).get(PROJECT_WIDE, Counts())

    def top(self, project: str, n: int) -> dict[str, int]:
        """The `n` clients (or `OTHER`) that spent the most tokens of `project` since the counters began."""
        clients = self._days.get((project, TOTAL), {})
        ranked = sorted(((c, k.tokens) for c, k in clients.items() if c != PROJECT_WIDE), key=lambda x: -x[1])
        return dict(ranked[:n])

    def check(self, quotas: Sequence[Quota]) -> None:
        """Raise `QuotaExceededError` when any quota is used up today."""
        for quota in quotas:
            if quota.exceeded_by(self.used_today(quota.key)):
                raise quota_error(quota, ms_to_midnight(self._clock()))

    def rows(self, days: int, project: str | None = None, client: str | None = None) -> list[UsageRow]:
        """The last `days` days' rows (today included) and the totals, newest day first."""
        wanted = set(last_days(self._clock(), days)) | {TOTAL}
        return sorted_rows(
            UsageRow(day, p, c, counts)
            for (p, day), clients in self._days.items()
            if day in wanted and project in (None, p)
            for c, counts in clients.items()
            if client in (None, c) or c == PROJECT_WIDE
        )

    def _forget_old(self) -> None:
        """Drop the days past the retention (once a day: the first count of a new day)."""
        today = utc_day(self._clock())
        if today == self._pruned_on:
            return
        self._pruned_on = today
        keep = set(last_days(self._clock(), self._retention_days)) | {TOTAL}
        for key in [k for k in self._days if k[1] not in keep]:
            del self._days[key]


def last_days(now_s: float, days: int) -> list[str]:
    """The UTC days of the last `days` days, today first."""
    return [utc_day(now_s - i * DAY_S) for i in range(max(1, days))]


def sorted_rows(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Totals last, newest day first, then project, the project's own line first, then clients by tokens."""
    return sorted(
        rows,
        key=lambda r: (
            r.day == TOTAL,
            _neg_day(r.day),
            r.project,
            r.client != PROJECT_WIDE,
            -r.counts.tokens,
            r.client,
        ),
    )


def _neg_day(day: str) -> tuple[int, ...]:
    return tuple(-int(x) for x in day.split("-")) if day != TOTAL else ()
