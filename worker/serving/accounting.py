"""What one request spent, added up as it runs and counted once when it ends (issue 31).

Tokens are counted where the engine reports them (`generation`), so a request cancelled, expired or
failed after it generated still counts what it cost. Just before its final reply goes out, `serve`
hands the sum to the state layer (fleet-wide counters and quotas: `state/usage.py`) and to this
worker's own per-project counters (telemetry): a client that waits for its reply before it sends the
next request is checked against budgets that include it. A request that ends without a reply of its
own counts only if it generated. A request that never ran (a duplicate answered from the dedupe cache,
a copy left to the worker that holds its requestId) counts nothing; one refused by a rate limit or a
quota counts as `refused`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from worker.errors import ErrorCode
from worker.protocol import Request
from worker.serving.admission import client_key
from worker.state import Counts, Usage
from worker.state.usage import OTHER, utc_day, wall_clock

REFUSALS = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED})
TOP_CLIENTS = 16
"""Clients per project in telemetry (and so in Prometheus labels): a bounded label set."""
TOKEN_COUNTERS = ("prompt_tokens", "completion_tokens", "cached_tokens")
"""This worker's per-project counters (telemetry) that add tokens."""


@dataclass(slots=True)
class Spent:
    """A request's tokens so far, over every generation it ran (device-tool rounds add up, as `usage` does)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    counted: bool = False
    """Handed to the counters already (a request counts once, whatever happens after)."""

    def generation(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One generation reached the engine's first output: its prompt was prefilled (part from cache)."""
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens


def usage_of(request: Request, spent: Spent, code: ErrorCode | None, *, replied: bool) -> Usage | None:
    """The counts of a request that ended; None when it neither ran nor was refused.

    It ends with a final reply (`code`: its error, None: an answer) or, when not `replied`, without one.
    """
    generated = spent.prompt_tokens or spent.completion_tokens
    if not replied and not generated:
        return None
    refused = code in REFUSALS and not generated
    counts = Counts(
        requests=0 if refused else 1,
        prompt_tokens=spent.prompt_tokens,
        completion_tokens=spent.completion_tokens,
        cached_tokens=spent.cached_tokens,
        errors=int((code is not None or not replied) and not refused),
        refused=int(refused),
    )
    return Usage(request.route.project, client_key(request)[1], counts)


class ClientTally:
    """Tokens per project and client that this worker spent since it started (telemetry's top clients).

    Bounded: `max_clients` clients per project by name, the rest together as `OTHER`.
    """

    def __init__(self, max_clients: int = 1000) -> None:
        self._max_clients = max_clients
        self._tokens: dict[str, Counter[str]] = {}
        self._today: dict[str, tuple[str, int]] = {}

    def add(self, usage: Usage) -> None:
        """Count one request's tokens (prompt + completion) under its client, and today's per project."""
        clients = self._tokens.setdefault(usage.project, Counter())
        who = usage.client if usage.client in clients or len(clients) < self._max_clients else OTHER
        clients[who] += usage.counts.tokens
        day = utc_day(wall_clock())
        seen, tokens = self._today.get(usage.project, (day, 0))
        self._today[usage.project] = (day, (tokens if seen == day else 0) + usage.counts.tokens)

    def today(self, project: str) -> int:
        """Tokens of `project` spent here today (UTC)."""
        day, tokens = self._today.get(project, ("", 0))
        return tokens if day == utc_day(wall_clock()) else 0

    def top(self, project: str, n: int = TOP_CLIENTS) -> dict[str, int]:
        """The `n` clients that spent the most tokens of `project` here."""
        return dict(self._tokens.get(project, Counter()).most_common(n))


def add_to(counters: Counter[tuple[str, str]], usage: Usage) -> None:
    """Add to the worker's own per-project token counters (since start; telemetry's `projects`)."""
    for name in TOKEN_COUNTERS:
        counters[(usage.project, name)] += getattr(usage.counts, name)
