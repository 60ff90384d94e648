"""The state layer's one interface: sessions, dedupe, rate limits, usage and quotas (DESIGN section 5).

A worker keeps per-request state that must hold across a fleet and across restarts: chat history,
requestIds already answered, rate-limit budgets, what each project and client spent. `State` is that
state behind one small interface, so
the request path (`serve`) does not know where it lives: `memory` (one process, the default) or
`redis://` (shared by every worker of a share group; see `state/redis.py`).

Every method is a bounded operation: a backend that cannot answer raises `StateUnavailableError`
(sessions) or degrades to this process's own state (dedupe, rate limits) and says so in `health()`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, Self

from worker.protocol import FinalReply
from worker.protocol.tools import ToolCall, ToolResult
from worker.state.usage import Quota, Usage, UsageBook, UsageRow

SessionKey = tuple[str, str, str]
"""(project, owner, sessionId): see `Request.session_key`."""
DedupeKey = tuple[str, str, str]
"""(project, owner, requestId): see `Request.dedupe_key`."""
Fence = str | None
"""A session lock holder's token (None where a holder cannot outlive its lock: memory)."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One answered exchange of a session, with its token cost (user + assistant)."""

    user: str
    assistant: str
    tokens: int
    request_id: str | None = None
    """The request that produced it: a turn is recorded at most once per requestId, whatever the retries,
    and a retry of a recorded turn is answered from it instead of being generated again."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the answer made (it ended asking for tools): the next turn answers them."""
    tool_results: tuple[ToolResult, ...] = ()
    """The results this turn began with (it continues the previous turn's calls: the two are one unit)."""


@dataclass(frozen=True, slots=True)
class History:
    """A session's stored state: its turns (oldest first) and its systemPrompt override."""

    turns: tuple[Turn, ...] = ()
    system_prompt: str | None = None


class Claim(Enum):
    """Dedupe verdict for a client-supplied requestId."""

    NEW = "new"
    """Nobody had it: this caller now holds it and must `complete` or `abandon` it."""
    IN_FLIGHT = "in_flight"
    """Someone holds it and is alive (its lease is renewed): its final reply is on the way."""
    DONE = "done"
    """Answered within the dedupe window: the cached final reply comes with it."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """`claim`'s answer."""

    verdict: Claim
    final: FinalReply | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """One token bucket to take from: `key` (project, client or "*"), refilled at `rate_per_s` up to `burst`."""

    key: tuple[str, str]
    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class StateHealth:
    """What telemetry reports about the state backend."""

    backend: str
    healthy: bool
    latency_ms: float | None = None
    """Round trip of the last health probe (None for memory)."""
    degraded: bool = False
    """Dedupe and rate limits currently run on this worker's own state (the backend is unreachable)."""


class State(Protocol):
    """See the module docstring. An async context manager: connect on enter, close on exit."""

    backend: str

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...

    # ---- sessions --------------------------------------------------------------------------------------
    async def load(self, key: SessionKey) -> History:
        """The session's turns and override (empty when new or expired)."""
        ...

    async def append(
        self, key: SessionKey, turn: Turn, system_prompt: str | None, max_tokens: int, fence: Fence = None
    ) -> None:
        """Add a turn (and store the override when given), then trim oldest turns to `max_tokens`; atomic.

        At most once per `turn.request_id`, and only while `fence` (what `lock` yielded) still holds the
        session's turn. Returns once the turn is recorded (or was already); raises `StateUnavailableError`
        only when the turn is not recorded and never will be, so a client told "failed" never finds it in
        the history later (a write that timed out on our side may still run on the server).
        """
        ...

    async def reset(self, key: SessionKey) -> bool:
        """Forget the session; True if it existed."""
        ...

    def lock(self, key: SessionKey) -> AbstractAsyncContextManager[Fence]:
        """Hold the session's turn: one holder at a time, waiters served in arrival order.

        A dead holder's lease expires (`lease_s`), so a crashed worker never blocks a session for good. It
        yields the fence token `append` checks: a holder whose lease lapsed (a paused worker) records nothing.
        """
        ...

    def sessions(self, project: str) -> int | None:
        """Sessions held for a project, when the backend can count them cheaply (else None)."""
        ...

    # ---- dedupe ----------------------------------------------------------------------------------------
    async def claim(self, key: DedupeKey) -> Claimed:
        """Claim a client-supplied requestId (see `Claim`)."""
        ...

    async def complete(self, key: DedupeKey, final: FinalReply) -> bool:
        """The claim's final reply goes out now: cache it for the dedupe window.

        False when another worker holds or answered the requestId since (this one's claim lapsed while it was
        paused): its final reply must not go out, the other's is the one. True otherwise, also when the
        backend cannot be reached (the reply goes out uncached).
        """
        ...

    async def abandon(self, key: DedupeKey) -> bool:
        """Give a claim back without a cached reply (a transient error, or left for redelivery).

        False, as for `complete`, when another worker holds or answered the requestId since.
        """
        ...

    # ---- rate limits -----------------------------------------------------------------------------------
    async def take(self, budgets: Sequence[Budget], quotas: Sequence[Quota] = ()) -> None:
        """Check the daily quotas, then take one token from every bucket, or none.

        Raises `QuotaExceededError` (retry at the next UTC midnight) or `RateLimitedError` (with retry-after).
        """
        ...

    # ---- usage -----------------------------------------------------------------------------------------
    def record_usage(self, usage: Usage) -> Awaitable[None] | None:
        """Count one finished request for today; never raises.

        None: counted. Else await the result (bounded, never raises): it ends once the count is in the
        shared backend, or once that is down or slow (the count then stays queued and is sent when it
        answers, exactly once).
        """
        ...

    async def usage_rows(self, days: int, project: str | None = None, client: str | None = None) -> list[UsageRow]:
        """The counters of the last `days` UTC days and the running totals (`vllm-worker usage`)."""
        ...

    def own_usage(self) -> UsageBook:
        """What this worker counted itself since it started, in this process (its telemetry reads it)."""
        ...

    # ---- health ----------------------------------------------------------------------------------------
    def health(self) -> StateHealth:
        """The backend's health as last seen."""
        ...

    async def monitor(self) -> None:
        """Probe the backend and renew this worker's leases, forever (a supervised loop)."""
        ...
