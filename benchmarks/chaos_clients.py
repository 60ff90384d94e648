"""The chaos run's clients: multi-turn v2 sessions with streams, same-requestId retries, cancels and resets.

Each client is one MQTT 5 connection (persistent session, so replies published while it reconnects wait
for it) with its own seeded RNG, so its choices replay from the run's seed. A session is sequential: a
turn is sent once the previous one has its final reply. Every message is unique (`c3s1t7`), so the fake
engine's history oracle ("history: m1 | m2 | ...") names exactly the user turns it saw.

Every send and every reply is appended to `events.jsonl`; `Records` keeps, in memory, only what the checker
needs: per requestId its sends, its final replies (text, code, worker, payload digest) and its chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chaos_fleet import PROJECT

from worker.config import BrokerConfig
from worker.transport.bus import Bus

TRANSIENT = frozenset({"state_unavailable", "overloaded", "shutting_down", "engine_error", "rate_limited"})
"""Error codes a client retries with the same requestId (PROTOCOL section 3; serve.TRANSIENT)."""


@dataclass(frozen=True)
class Load:
    """What the clients do, and how patient they are."""

    clients: int = 32
    max_turns: int = 10
    max_tokens: int = 200
    p_cancel: float = 0.06
    p_duplicate: float = 0.06
    p_reask: float = 0.06
    p_reask_old: float = 0.03
    p_reset: float = 0.08
    think_s: float = 0.3
    attempt_timeout_s: float = 20.0
    """No message for a request this long: send it again (same requestId)."""
    give_up_s: float = 180.0
    """No final reply this long after the first send: the request is reported as never answered."""


@dataclass(frozen=True)
class Reply:
    """One v2 message received for a request."""

    at: float
    worker: str
    seq: int
    done: bool
    code: str | None
    text: str
    digest: str
    retry_after_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.code is None


@dataclass
class RequestRecord:
    """One turn (or its requestId, across every copy sent)."""

    rid: str
    client: str
    session: str
    turn: int
    message: str
    sends: list[tuple[float, str]] = field(default_factory=list)
    finals: list[Reply] = field(default_factory=list)
    chunks: dict[int, str] = field(default_factory=dict)
    """seq -> delta of the first chunk with that seq (chunks do not name their worker)."""
    chunk_at: float | None = None
    cancel_at: float | None = None
    gave_up: bool = False

    def outcome(self) -> Reply | None:
        """The first final that is not a transient error (what the client acted on)."""
        return next((r for r in self.finals if r.code not in TRANSIENT), None)


@dataclass
class SessionRecord:
    """A session's story in client order: ("turn", rid) and ("reset", confirmed-at) items."""

    client: str
    session: str
    steps: list[tuple[str, Any]] = field(default_factory=list)
    ended: str = ""


class Records:
    """Everything the clients saw: in memory for the checker, and every event appended to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self.requests: dict[str, RequestRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.resets: dict[str, list[tuple[float, str]]] = {}
        """Per session: (time, what) of every reset sent, confirmed or failed (traces)."""

    def reset_event(self, session: str, what: str, at: float | None = None) -> float:
        at = at or self.event("reset", session=session, what=what)
        self.resets.setdefault(session, []).append((at, what))
        return at

    def event(self, kind: str, **fields: Any) -> float:
        now = time.time()
        self._file.write(json.dumps({"t": round(now, 4), "ev": kind, **fields}) + "\n")
        return now

    def close(self) -> None:
        self._file.close()


def parse_reply(payload: bytes) -> tuple[dict[str, Any], Reply] | None:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    reply = Reply(
        at=time.time(),
        worker=str(body.get("worker", "?")),
        seq=int(body.get("seq", 0)),
        done=bool(body.get("done")),
        code=error.get("code"),
        text=str(body.get("text", body.get("delta", ""))),
        digest=hashlib.blake2b(payload, digest_size=8).hexdigest(),
        retry_after_ms=error.get("retryAfterMs"),
    )
    return body, reply


class ChaosClient:
    """One clientId: sessions one after another until `stop` is set, each turn retried until it has a final."""

    def __init__(self, index: int, broker_url: str, seed: int, load: Load, records: Records) -> None:
        self.id = f"c{index:02d}"
        self._rng = random.Random(f"{seed}:{self.id}")  # noqa: S311 - seeded on purpose: a run replays
        self._load = load
        self._records = records
        self._bus = Bus(BrokerConfig(url=broker_url, keepalive_s=10), self.id, protocol="5", persistent=True)
        self._waiting: dict[str, asyncio.Queue[Reply]] = {}
        self._reset_waiting: dict[str, asyncio.Queue[Reply]] = {}
        self._side: set[asyncio.Task[None]] = set()
        self.turns = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with self._bus:
            await self._bus.subscribe([f"{PROJECT}/response/{self.id}"])
            reader = asyncio.create_task(self._read())
            try:
                number = 0
                while not stop.is_set():
                    await self._session(f"{self.id}s{number}", stop)
                    number += 1
            finally:
                for task in self._side:
                    task.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self) -> None:
        while True:
            msg = await self._bus.messages()
            self._bus.ack(msg)
            parsed = parse_reply(msg.payload)
            if parsed is None:
                continue
            body, reply = parsed
            rid = body.get("requestId")
            if not rid:  # a session reset's confirmation or failure
                sid = str(body.get("sessionId"))
                ok = bool(body.get("reset"))
                self._records.event("reset_reply", client=self.id, session=sid, ok=ok, code=reply.code)
                if (queue := self._reset_waiting.get(sid)) is not None:
                    confirmed = Reply(reply.at, "", 0, done=True, code=None, text="reset", digest="")
                    queue.put_nowait(confirmed if ok else reply)
                continue
            self._take(str(rid), reply)

    def _take(self, rid: str, reply: Reply) -> None:
        rec = self._records.requests.get(rid)
        if rec is None:
            return
        if reply.done:
            rec.finals.append(reply)
            self._records.event(
                "final", rid=rid, worker=reply.worker, seq=reply.seq, code=reply.code, text=reply.text, d=reply.digest
            )
        else:
            rec.chunks.setdefault(reply.seq, reply.text)
            rec.chunk_at = rec.chunk_at or reply.at
            self._records.event("chunk", rid=rid, seq=reply.seq, delta=reply.text)
        if (queue := self._waiting.get(rid)) is not None:
            queue.put_nowait(reply)

    def _publish(self, topic: str, body: dict[str, Any]) -> None:
        # wait=False: paho queues it across a reconnect; the attempt timeout covers a lost one
        task = asyncio.create_task(self._bus.publish(topic, json.dumps(body).encode(), wait=False))
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _session(self, sid: str, stop: asyncio.Event) -> None:
        rng, load = self._rng, self._load
        record = SessionRecord(self.id, sid)
        self._records.sessions[sid] = record
        done: list[RequestRecord] = []
        for turn in range(rng.randint(3, load.max_turns)):
            if stop.is_set():
                record.ended = "run over"
                return
            if turn and rng.random() < load.p_reset:
                confirmed = await self._reset(sid)
                if confirmed is None:
                    record.ended = "reset never confirmed"
                    return
                record.steps.append(("reset", confirmed))
            rec = RequestRecord(f"{sid}t{turn}", self.id, sid, turn, f"{sid}t{turn}m")
            self._records.requests[rec.rid] = rec
            record.steps.append(("turn", rec.rid))
            await self._ask(rec, cancel=rng.random() < load.p_cancel, duplicate=rng.random() < load.p_duplicate)
            self.turns += 1
            if rec.gave_up:
                record.ended = "no final reply"
                return
            done.append(rec)
            if rng.random() < load.p_reask:
                await self._reask(rec)
            if len(done) > 1 and rng.random() < load.p_reask_old:
                await self._reask(rng.choice(done[:-1]))
            await asyncio.sleep(rng.uniform(0, load.think_s))
        record.ended = "complete"

    def _body(self, rec: RequestRecord) -> dict[str, Any]:
        return {
            "v": 2,
            "clientId": self.id,
            "sessionId": rec.session,
            "requestId": rec.rid,
            "message": rec.message,
            "stream": True,
            "maxTokens": self._load.max_tokens,
        }

    def _send(self, rec: RequestRecord, why: str) -> None:
        at = self._records.event("send", rid=rec.rid, session=rec.session, why=why)
        rec.sends.append((at, why))
        self._publish(f"{PROJECT}/user_input", self._body(rec))

    async def _later(self, delay_s: float, action: Any) -> None:
        await asyncio.sleep(delay_s)
        action()

    def _cancel(self, rec: RequestRecord) -> None:
        rec.cancel_at = self._records.event("cancel", rid=rec.rid)
        self._publish(f"{PROJECT}/cancel", {"requestId": rec.rid, "clientId": self.id})

    async def _ask(self, rec: RequestRecord, *, cancel: bool, duplicate: bool) -> None:
        """Send until a final that is not a transient error arrives (or give up after `give_up_s`)."""
        rng, load = self._rng, self._load
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._waiting[rec.rid] = queue
        extras = []
        if duplicate:
            extras.append(asyncio.create_task(self._later(rng.uniform(0, 0.5), lambda: self._send(rec, "duplicate"))))
        if cancel:
            extras.append(asyncio.create_task(self._later(rng.uniform(0.1, 1.5), lambda: self._cancel(rec))))
        started = time.monotonic()
        self._send(rec, "first")
        try:
            while True:
                left = started + load.give_up_s - time.monotonic()
                if left <= 0:
                    rec.gave_up = True
                    self._records.event("gave_up", rid=rec.rid)
                    return
                try:
                    async with asyncio.timeout(min(left, load.attempt_timeout_s)):
                        reply = await queue.get()
                except TimeoutError:
                    if time.monotonic() - started < load.give_up_s:
                        self._send(rec, "timeout")
                    continue
                if not reply.done:
                    continue
                if reply.code not in TRANSIENT:
                    return
                await asyncio.sleep(min(5.0, (reply.retry_after_ms or 500) / 1000) * rng.uniform(1.0, 1.5))
                self._send(rec, f"after {reply.code}")
        finally:
            del self._waiting[rec.rid]
            for task in extras:
                task.cancel()

    async def _reask(self, rec: RequestRecord) -> None:
        """Send an answered requestId again: its cached final reply must come back, identical."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._waiting[rec.rid] = queue
        try:
            for _ in range(3):
                self._send(rec, "reask")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while not (reply := await queue.get()).done:
                            continue
                        if reply.code not in TRANSIENT:
                            return
                await asyncio.sleep(1.0)
        finally:
            del self._waiting[rec.rid]

    async def _reset(self, sid: str) -> float | None:
        """Reset until a worker confirms; the confirmation's time, or None when none came in time."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._reset_waiting[sid] = queue
        started = time.monotonic()
        reset_id = f"reset-{uuid.uuid4().hex[:12]}"  # one per logical reset, kept across its retries
        try:
            while time.monotonic() - started < self._load.give_up_s:
                self._records.reset_event(sid, "sent")
                body = {"v": 2, "clientId": self.id, "sessionId": sid, "requestId": reset_id}
                self._publish(f"{PROJECT}/session/reset", body)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._load.attempt_timeout_s):
                        while True:
                            reply = await queue.get()
                            if reply.code is None:
                                return self._records.reset_event(sid, "confirmed", reply.at)
                            self._records.reset_event(sid, f"failed: {reply.code}", reply.at)
                            # another worker may still confirm it; else send it again shortly
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(2.0):
                                    while (again := await queue.get()).code is not None:
                                        continue
                                    return self._records.reset_event(sid, "confirmed", again.at)
                            break
                await asyncio.sleep(1.0)
            self._records.event("reset_gave_up", session=sid)
            return None
        finally:
            del self._reset_waiting[sid]
