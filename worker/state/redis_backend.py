"""`RedisState`: the state layer in Redis or Valkey, shared by every worker of a fleet (`state.url`).

Sessions (turn list + system prompt), requestId claims and token buckets live under
`{key_prefix}/{topic_prefix}{project}/...`, every key with a TTL. Each read-check-write is one Lua script
(`state/scripts.py`). Session locks and claims are leases this worker renews (`RedisLink.monitor`); a
worker that dies stops renewing and its leases lapse after `lease_s`. `max_sessions`, `dedupe_max_entries`
and `dedupe_max_bytes` hold per project for the whole fleet, through indexes under `{project}/idx/`.

Redis unreachable (the documented degraded mode, docs/protocol.md): calls fail fast and the link probes
until it answers again (`redis_link`). Meanwhile stateful turns are refused with `state_unavailable`
(history is never silently dropped), while stateless requests keep working with this worker's own dedupe
and rate limits (`health().degraded`). Standalone Redis/Valkey (not Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Self

import redis.asyncio as aioredis
import structlog

from worker.errors import RateLimitedError, StateUnavailableError
from worker.protocol import FinalReply
from worker.state import scripts
from worker.state.base import Budget, Claim, Claimed, DedupeKey, Fence, History, SessionKey, StateHealth, Turn
from worker.state.codec import decode_final, decode_turn, encode_final, encode_turn, redact
from worker.state.memory import MAX_TURNS, MemoryLimits, MemoryState
from worker.state.redis_link import RECORD_ATTEMPTS, RedisLink
from worker.state.redis_usage import RedisUsage
from worker.state.usage import Quota, Usage, UsageBook, UsageRow, quota_error

log = structlog.get_logger(__name__)
FENCED, EXPIRED = -2, -3  # APPEND's refusals: the lock passed to another worker; the attempt came too late
CLOCK_MARGIN_S = 0.05
RATE_LIMITED, QUOTA_EXCEEDED = 1, 2  # TAKE's refusals


class RedisState:
    """See the module docstring."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        namespace: str,
        limits: MemoryLimits,
        *,
        lease_s: float = 10.0,
        op_timeout_s: float = 1.0,
    ) -> None:
        self._url = url
        self._ns = namespace
        self._limits = limits
        self._link = RedisLink(url, lease_s=lease_s, op_timeout_s=op_timeout_s)
        self._local = MemoryState(limits)  # dedupe, rate limits, quotas (this worker's counts) while Redis is down
        self.usage = RedisUsage(
            self._link, namespace, max_clients=limits.usage_max_clients, retention_days=limits.usage_retention_days
        )
        self._local_claims: set[DedupeKey] = set()
        self._incarnation = uuid.uuid4().hex[:16]
        self._seq = itertools.count()
        self._claims: dict[DedupeKey, str] = {}  # our claim tokens
        self._attempt_s = 2 * op_timeout_s
        """How long after it is sent an append may still land on the server (its deadline)."""
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def _r(self) -> aioredis.Redis:
        return self._link.r

    async def __aenter__(self) -> Self:
        up = await self._link.open()
        r = self._r
        self._enter, self._try, self._leave = map(
            r.register_script, (scripts.LOCK_ENTER, scripts.LOCK_TRY, scripts.LOCK_LEAVE)
        )
        self._append, self._claim = map(r.register_script, (scripts.APPEND, scripts.CLAIM))
        self._complete, self._abandon, self._take = map(
            r.register_script, (scripts.COMPLETE, scripts.ABANDON, scripts.TAKE)
        )
        self.usage.open()
        if not up:
            log.warning("state.start_degraded", url=redact(self._url), action="stateful requests get state_unavailable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._releases):
            task.cancel()
        await self.usage.drain(timeout_s=2 * self._link.op_timeout_s)
        await self._link.close()

    def _token(self) -> str:
        return f"{self._incarnation}-{next(self._seq)}"

    # ---- sessions --------------------------------------------------------------------------------------
    def _session(self, key: SessionKey, kind: str) -> str:
        return f"{self._session_base(key)}/{kind}"

    def _session_base(self, key: SessionKey) -> str:
        """The session's key prefix, and its member in the project's session index."""
        project, owner, session_id = key
        return f"{self._ns}{project}/s/{owner}/{session_id}"

    def _index(self, project: str, kind: str) -> str:
        """A project's bound-keeping index: `sessions`, `replies`, `reply-sizes`, `reply-bytes`."""
        return f"{self._ns}{project}/idx/{kind}"

    async def load(self, key: SessionKey) -> History:
        """See `State.load`; an unreadable item (not ours) is skipped and logged."""
        pipe = self._r.pipeline(transaction=False)
        pipe.lrange(self._session(key, "t"), 0, -1)
        pipe.get(self._session(key, "p"))
        items, prompt = await self._link.call(pipe.execute)
        turns = tuple(t for t in (decode_turn(item) for item in items) if t is not None)
        if len(turns) != len(items):
            log.warning("state.bad_turns", skipped=len(items) - len(turns))
        return History(turns, prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else None)

    async def append(
        self, key: SessionKey, turn: Turn, system_prompt: str | None, max_tokens: int, fence: Fence = None
    ) -> None:
        """See `State.append`: one script (at most once per requestId, fenced, with a deadline), retried.

        An attempt that times out here may still run on the server after a stall; each carries a deadline on
        the server's clock, so it can only land within 2 x op_timeout_s of being sent. Attempts are retried (a
        requestId is recorded once) for `RECORD_ATTEMPTS` x op_timeout_s; only then, and only once every
        attempt's deadline has passed, is the turn reported failed: it is certainly not recorded, and never
        will be.
        """
        item = encode_turn(turn)
        ttl_ms = round(self._limits.idle_ttl_s * 1000)
        args: list[str | int] = [
            item,
            max_tokens,
            ttl_ms,
            "1" if system_prompt is not None else "0",
            system_prompt or "",
            MAX_TURNS,
            self._session_base(key),
            self._limits.max_sessions,
            fence or "",
            turn.request_id or f"auto-{self._token()}",
        ]
        keys = [
            self._session(key, "t"),
            self._session(key, "p"),
            self._index(key[0], "sessions"),
            self._session(key, "q"),
            self._session(key, "ids"),
        ]
        give_up = time.monotonic() + RECORD_ATTEMPTS * self._link.op_timeout_s
        last_deadline = 0.0
        while True:
            deadline = time.time() + self._attempt_s
            last_deadline = deadline
            attempt = functools.partial(self._append, keys=keys, args=[*args, self._link.server_ms(deadline)])
            try:
                result = int(await self._link.call(attempt))
            except StateUnavailableError:
                if time.monotonic() >= give_up:
                    break
                await self._link.pause()
                continue
            if result == FENCED:
                log.warning("state.turn_fenced", project=key[0], reason="this worker's session lease lapsed")
                raise StateUnavailableError("the session's turn passed to another worker", retry_after_ms=1000)
            if result != EXPIRED:
                return  # recorded now, or before (a retry)
        await asyncio.sleep(max(0.0, last_deadline + self._link.offset_err_s + CLOCK_MARGIN_S - time.time()))
        raise StateUnavailableError(retry_after_ms=1000)  # every attempt's deadline passed: none can land now

    async def reset(self, key: SessionKey) -> bool:
        """See `State.reset`: the session and its index entry, in one transaction (one round trip)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._session(key, "t"), self._session(key, "p"), self._session(key, "ids"))
        pipe.zrem(self._index(key[0], "sessions"), self._session_base(key))
        deleted, _ = await self._link.call(pipe.execute)
        return bool(deleted)

    @contextlib.asynccontextmanager
    async def lock(self, key: SessionKey) -> AsyncIterator[Fence]:
        """See `State.lock`: a FIFO queue in Redis; a waiter blocks until woken (or a bounded wait ends)."""
        queue, token = self._session(key, "q"), self._token()
        alive = f"{queue}:a:{token}"
        self._link.leases[alive] = token
        lease_ms = self._link.lease_ms
        idle_ms = max(lease_ms * 4, round(self._limits.idle_ttl_s * 1000))
        wake_key, wait_s = f"{queue}:w:{token}", max(0.05, min(0.5, self._link.op_timeout_s / 2))
        try:
            got = await self._link.call(lambda: self._enter(keys=[queue], args=[token, lease_ms, idle_ms]))
            while got != 1:
                if got == -1:  # our lease lapsed (a long stall): queue again
                    log.warning("state.lock_requeued", project=key[0])
                    got = await self._link.call(lambda: self._enter(keys=[queue], args=[token, lease_ms, idle_ms]))
                    continue
                # woken when we become the head; the bounded wait also catches a holder that died
                await self._link.call(lambda: self._blpop(wake_key, wait_s))
                got = await self._link.call(lambda: self._try(keys=[queue], args=[token, self._link.lease_ms]))
            yield token
        finally:
            self._link.leases.pop(alive, None)
            try:
                await self._link.call(lambda: self._leave(keys=[queue], args=[token, self._link.lease_ms]))
            except StateUnavailableError:  # given back as soon as Redis answers (else it lapses in lease_s)
                self._release_later(queue, token)

    def _release_later(self, queue: str, token: str) -> None:
        """Retry a lock's release in the background until Redis answers, for at most `lease_s`."""
        task = asyncio.ensure_future(self._retry_release(queue, token))  # supervised: never raises, ends by lease_s
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _retry_release(self, queue: str, token: str) -> None:
        ends = time.monotonic() + self._link.lease_ms / 1000
        while time.monotonic() < ends:
            await asyncio.sleep(min(0.25, self._link.op_timeout_s / 2))
            try:
                await self._link.call(lambda: self._leave(keys=[queue], args=[token, self._link.lease_ms]))
            except StateUnavailableError:
                continue
            log.info("state.lock_released_late", queue=queue.rsplit("/", 2)[0][-64:])
            return

    async def _blpop(self, key: str, wait_s: float) -> object:
        return await self._r.blpop([key], timeout=wait_s)

    def sessions(self, project: str) -> int | None:  # noqa: ARG002 - the interface's signature
        """Not counted: the fleet's sessions live in Redis, not here."""
        return None

    # ---- dedupe ----------------------------------------------------------------------------------------
    def _request(self, key: DedupeKey) -> str:
        project, owner, request_id = key
        return f"{self._ns}{project}/r/{owner}/{request_id}"

    async def claim(self, key: DedupeKey) -> Claimed:
        """See `State.claim`; while Redis is down, this worker's own dedupe answers (degraded)."""
        token = self._token()
        rkey = self._request(key)
        try:
            reply = await self._link.call(lambda: self._claim(keys=[rkey], args=[token, self._link.lease_ms]))
        except StateUnavailableError:
            self._local_claims.add(key)
            return await self._local.claim(key)
        verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if verdict == "new":
            self._claims[key] = token
            self._link.leases[rkey] = f"c:{token}"
            return Claimed(Claim.NEW)
        if verdict == "done":
            return Claimed(Claim.DONE, decode_final(reply[1]))
        return Claimed(Claim.IN_FLIGHT)

    async def complete(self, key: DedupeKey, final: FinalReply) -> bool:
        """See `State.complete`."""
        if key in self._local_claims:
            self._local_claims.discard(key)
            return await self._local.complete(key, final)
        token = self._claims.pop(key, "")
        rkey = self._request(key)
        self._link.leases.pop(rkey, None)
        window_ms = max(1, round(self._limits.dedupe_window_s * 1000))
        project = key[0]
        keys = [rkey, *(self._index(project, kind) for kind in ("replies", "reply-sizes", "reply-bytes"))]
        bounds = (self._limits.dedupe_max_entries, self._limits.dedupe_max_bytes)
        args: list[str | int] = [token, encode_final(final), window_ms, *bounds]
        verdict = await self._link.retried(functools.partial(self._complete, keys=keys, args=args))
        return verdict is None or bool(int(verdict))  # None: not cached, the reply goes out all the same

    async def abandon(self, key: DedupeKey) -> bool:
        """See `State.abandon`."""
        if key in self._local_claims:
            self._local_claims.discard(key)
            return await self._local.abandon(key)
        token = self._claims.pop(key, "")
        rkey = self._request(key)
        self._link.leases.pop(rkey, None)
        verdict = await self._link.retried(functools.partial(self._abandon, keys=[rkey], args=[token]))
        return verdict is None or bool(int(verdict))

    # ---- rate limits -----------------------------------------------------------------------------------
    async def take(self, budgets: Sequence[Budget], quotas: Sequence[Quota] = ()) -> None:
        """See `State.take`: one script for quotas and buckets, on the server's clock; this worker's while down."""
        if not budgets and not quotas:
            return
        keys = [f"{self._ns}{b.key[0]}/b/{b.key[1]}" for b in budgets]
        args: list[str | int] = [self._ns, self._limits.usage_max_clients, len(quotas)]
        for q in quotas:
            args += [q.key[0], q.key[1], _limit(q.tokens), _limit(q.requests)]
        args += [x for b in budgets for x in (repr(float(b.rate_per_s)), b.burst)]
        try:
            verdict = await self._link.call(lambda: self._take(keys=keys, args=args))
        except StateUnavailableError:
            await self._local.take(budgets, quotas)
            return
        kind = int(verdict[0])
        if kind == RATE_LIMITED:
            raise RateLimitedError(retry_after_ms=int(verdict[1]))
        if kind == QUOTA_EXCEEDED:
            raise quota_error(quotas[int(verdict[2]) - 1], int(verdict[1]))

    # ---- usage -----------------------------------------------------------------------------------------
    def record_usage(self, usage: Usage) -> Awaitable[None] | None:
        """See `State.record_usage`: sent by `RedisUsage`, waited for up to an op timeout while Redis answers.

        This worker's own book counts it too (the quotas while Redis is down).
        """
        self._local.record_usage(usage)
        sent = self.usage.add(usage)
        return self._until_sent(sent) if self._link.healthy and not sent.done() else None

    async def _until_sent(self, sent: asyncio.Future[None]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sent), self._link.op_timeout_s)

    async def usage_rows(self, days: int, project: str | None = None, client: str | None = None) -> list[UsageRow]:
        """See `State.usage_rows`: the fleet's counters."""
        return await self.usage.rows(days, project, client)

    def own_usage(self) -> UsageBook:
        """See `State.own_usage`: the book that also answers quotas while Redis is down."""
        return self._local.own_usage()

    # ---- health ----------------------------------------------------------------------------------------
    def health(self) -> StateHealth:
        """See `State.health`."""
        return self._link.health(self.backend)

    async def monitor(self) -> None:
        """See `State.monitor`: the link renews our leases and probes Redis; the usage queue is sent."""
        async with asyncio.TaskGroup() as group:  # either loop failing ends both, and this call with them
            group.create_task(self._link.monitor())  # supervised: by the group; the service's Loops supervise it
            group.create_task(self.usage.run())  # supervised: likewise (a dead sender stops the worker loudly)


def _limit(value: int | None) -> int:
    return -1 if value is None else value
