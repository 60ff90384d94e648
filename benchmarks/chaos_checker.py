"""The chaos run's checker: what the clients saw and what the workers logged, against the contract.

Per requestId: it ended with exactly one final reply (transient errors, which a retry with the same
requestId gets past, do not count; resends of the cached final are byte-identical and count once), and no
two generations of it both took effect (`fake.generated` lines; a generation whose process died under it,
or that ended in an error reply, is a legitimate re-run). Per session: every answer's history (the fake
engine's oracle lists the user turns it saw) equals the turns answered successfully since the last
confirmed reset, in order, plus this turn: no ghost, no duplicate, no gap. Each violation carries the
shortest trace that shows it: the client events and worker log lines of the requests involved.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos_clients import TRANSIENT, RequestRecord, SessionRecord
from chaos_faults import Injected
from chaos_logs import WorkerLogs

HISTORY_PREFIX = "history: "
HISTORY_SEPARATOR = " | "
NEAR_S = 1.5
"""Context (faults, worker trouble) shown around each event of a trace."""


@dataclass
class Violation:
    """One broken promise, with the trace that shows it."""

    kind: str
    subject: str
    summary: str
    rids: list[str] = field(default_factory=list)
    session: str | None = None
    trace: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "summary": self.summary, "trace": self.trace}


@dataclass
class Evidence:
    """Everything the checker reads."""

    requests: dict[str, RequestRecord]
    sessions: dict[str, SessionRecord]
    logs: WorkerLogs
    faults: list[Injected]
    resets: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    """Per session: the client's reset sends and their replies."""
    oracle: bool = True
    """The fake engine's history oracle and generation lines are there (False with the real engine)."""


def parse_history(text: str) -> list[str] | None:
    """The user turns the fake engine listed, oldest first (None when the text is not its answer)."""
    if not text.startswith(HISTORY_PREFIX):
        return None
    return text[len(HISTORY_PREFIX) :].split(HISTORY_SEPARATOR)


# ---- per requestId --------------------------------------------------------------------------------------
def check_finals(rec: RequestRecord) -> Violation | None:
    """Exactly one final reply: none at all, or two different non-transient ones, is a violation."""
    if rec.gave_up or not rec.finals:
        return Violation("no_final", rec.rid, f"no final reply within the client's patience ({len(rec.sends)} sends)")
    if rec.outcome() is None:
        codes = ",".join(sorted({str(r.code) for r in rec.finals}))
        return Violation("no_final", rec.rid, f"only transient errors ({codes})")
    distinct: dict[str, Any] = {}
    for reply in rec.finals:
        if reply.code not in TRANSIENT:
            distinct.setdefault(reply.digest, reply)
    if len(distinct) < 2:
        return None
    finals = list(distinct.values())
    ok = [r for r in finals if r.ok]
    if len(ok) >= 2:
        kind = "answered_twice"
    elif all(r.code == "cancelled" for r in finals):
        kind = "cancelled_twice"
    else:
        kind = "conflicting_finals"
    desc = ", ".join(f"{r.code or 'ok'} from {r.worker}" for r in finals)
    return Violation(kind, rec.rid, f"{len(finals)} different final replies: {desc}")


def generation_fates(rec: RequestRecord, logs: WorkerLogs) -> list[str]:
    """Per `fake.generated` line of the requestId, in time order, what became of it: superseded (its worker
    says another copy took over: no effect), answered (`request.done` in that process before its next
    generation there), failed (an error reply from that worker followed), died (its process went away under
    it), or unexplained. A worker runs one copy of a requestId at a time, so its replies match in order."""
    gens = sorted(logs.generations(rec.rid), key=lambda g: g.ts)
    lines = logs.by_request.get(rec.rid, [])
    errors = sorted((r for r in rec.finals if r.code is not None), key=lambda r: r.at)
    fates = []
    for i, gen in enumerate(gens):
        here = (gen.worker, gen.incarnation)
        until = min((g.ts for g in gens[i + 1 :] if (g.worker, g.incarnation) == here), default=math.inf)
        ends = {x.event for x in lines if (x.worker, x.incarnation) == here and gen.ts <= x.ts < until}
        error = next((r for r in errors if r.worker == gen.worker and r.at >= gen.ts), None)
        if "request.superseded" in ends:
            fates.append("superseded")
        elif "request.done" in ends:
            fates.append("answered")
        elif error is not None:
            errors.remove(error)
            fates.append("failed")
        elif logs.ended(*here):
            fates.append("died")
        else:
            fates.append("unexplained")
    return fates


def check_generations(rec: RequestRecord, logs: WorkerLogs) -> Violation | None:
    """No requestId generated twice with effect: two answers, or a re-run while an earlier run of it went
    unexplained (it neither answered, failed, gave way nor died)."""
    fates = generation_fates(rec, logs)
    if len(fates) < 2 or (fates.count("answered") < 2 and "unexplained" not in fates):
        return None
    return Violation("generated_twice", rec.rid, f"{len(fates)} generations: {', '.join(fates)}")


def check_stream(rec: RequestRecord, generations: int) -> Violation | None:
    """The chunks of the answer's only generation add up to (a prefix of) its final text."""
    outcome = rec.outcome()
    if outcome is None or not outcome.ok or generations != 1:
        return None
    parts = [rec.chunks.get(seq) for seq in range(1, outcome.seq)]
    if any(p is None for p in parts):
        return None  # a chunk lost with a process or connection: not what this check judges
    streamed = "".join(p for p in parts if p is not None)
    if outcome.text.startswith(streamed):
        return None
    return Violation("stream_mismatch", rec.rid, f"chunks {streamed[:60]!r} do not start the final text")


# ---- per session ------------------------------------------------------------------------------------------
def _late_reset(session: str, since: float, logs: WorkerLogs) -> bool:
    """A worker reset the session after `since` (a turn's first send): a reset the client had seen confirmed
    before it sent that turn, applied late (a client never resets while a turn is in flight)."""
    return any(line.event == "session.reset" and line.ts > since for line in logs.by_session.get(session, []))


def _classify(  # noqa: PLR0911 - one verdict per way a history can diverge
    seen: list[str], expected: list[str], rec: RequestRecord, owner: dict[str, RequestRecord], before_reset: set[str]
) -> tuple[str, list[str]] | None:
    """What is wrong with the history the engine saw (None when it is the expected one)."""
    if seen[-1:] != [rec.message]:
        return "wrong_answer", []
    prior = seen[:-1]
    if prior == expected:
        return None
    counts = Counter(prior)
    extra = [m for m in prior if m not in expected]
    if rec.message in prior:  # an earlier attempt of this very turn was recorded
        return "ghost_turn", [rec.rid]
    if extra:
        culprits = [owner[m].rid for m in extra if m in owner]
        if any(m in before_reset for m in extra):
            return "reset_lost", culprits
        if any(m not in owner for m in extra):
            return "foreign_turn", []
        return "ghost_turn", culprits
    if dup := [m for m, n in counts.items() if n > 1]:
        return "duplicate_turn", [owner[m].rid for m in dup if m in owner]
    if missing := [m for m in expected if m not in prior]:
        return "missing_turn", [owner[m].rid for m in missing if m in owner]
    return "order", []


def check_session(session: SessionRecord, ev: Evidence) -> list[Violation]:
    """Each answer's history against the session's successfully answered turns (see module docstring)."""
    out: list[Violation] = []
    expected: list[str] = []
    before_reset: set[str] = set()
    owner = {ev.requests[rid].message: ev.requests[rid] for kind, rid in session.steps if kind == "turn"}
    for kind, value in session.steps:
        if kind == "reset":
            before_reset.update(expected)
            expected = []
            continue
        rec = ev.requests[value]
        outcome = rec.outcome()
        if outcome is None or not outcome.ok:
            continue
        seen = parse_history(outcome.text)
        if seen is None:
            out.append(Violation("bad_answer", rec.rid, f"not the oracle's answer: {outcome.text[:80]!r}", [rec.rid]))
            continue
        verdict = _classify(seen, expected, rec, owner, before_reset)
        if verdict is not None:
            what, culprits = verdict
            if what == "missing_turn" and culprits:
                since = min(ev.requests[c].sends[0][0] for c in culprits)
                what = "late_reset" if _late_reset(session.session, since, ev.logs) else what
            told = "".join(f"; {c} was told {_told(ev.requests[c])}" for c in culprits if c != rec.rid)
            if rec.rid in culprits[:-1] or (what == "ghost_turn" and not told):
                told += f"; an earlier attempt of this turn was recorded (told {_told(rec)})"
            summary = f"the engine saw {_short(seen[:-1])} before turn {rec.turn}; answered: {_short(expected)}{told}"
            out.append(Violation(what, rec.rid, summary, [*culprits, rec.rid], session.session))
        expected = [*seen[:-1], rec.message]  # go on from what the engine saw: one fault, one report
    if session.ended == "reset never confirmed":
        out.append(Violation("no_final", session.session, "a session reset was never confirmed", [], session.session))
    return out


def _short(messages: list[str]) -> str:
    """Turn numbers only (`t0 t1 t3`): the session is named in the violation already."""
    return "[" + " ".join(m[m.rfind("t") :].removesuffix("m") for m in messages) + "]"


def _told(rec: RequestRecord) -> str:
    """Its final replies in order of first arrival, counted: `rate_limited x3, ok`."""
    counts = Counter(r.code or "ok" for r in rec.finals)
    return ", ".join(f"{code} x{n}" if n > 1 else code for code, n in counts.items()) or "nothing"


# ---- the whole run -----------------------------------------------------------------------------------------
def check(ev: Evidence) -> list[Violation]:
    """Every violation of the run, each with its trace."""
    out: list[Violation] = []
    for rec in ev.requests.values():
        if (v := check_finals(rec)) is not None:
            v.rids, v.session = [rec.rid], rec.session
            out.append(v)
        if ev.oracle:
            if (v := check_generations(rec, ev.logs)) is not None:
                v.rids, v.session = [rec.rid], rec.session
                out.append(v)
            if (v := check_stream(rec, len(ev.logs.generations(rec.rid)))) is not None:
                v.rids = [rec.rid]
                out.append(v)
    if ev.oracle:
        for session in ev.sessions.values():
            out += check_session(session, ev)
    for v in out:
        v.trace = trace(v, ev)
    return out


def trace(v: Violation, ev: Evidence) -> list[str]:
    """The client events and worker lines of the violation's requests (and its session's resets), in time
    order, with what happened around each of them (faults in progress, the workers' state and broker
    trouble within NEAR_S): the shortest story that shows the violation."""
    own: list[tuple[float, str, str]] = []
    workers: set[str] = set()
    for rid in dict.fromkeys(v.rids):
        if (rec := ev.requests.get(rid)) is not None:
            own += _client_rows(rec)
            workers.update(r.worker for r in rec.finals)
        for line in ev.logs.by_request.get(rid, []):
            workers.add(line.worker)
            own.append((line.ts, "worker", f"{line.render()} {rid}"))
    if v.session is not None:
        own += [(line.ts, "worker", f"{line.render()} {v.session}") for line in ev.logs.by_session.get(v.session, [])]
        own += [(at, "client", f"reset {v.session}: {what}") for at, what in ev.resets.get(v.session, [])]
    times = sorted(at for at, _, _ in own)

    def near(start: float, end: float) -> bool:
        i = bisect.bisect_left(times, start - NEAR_S)
        return i < len(times) and times[i] <= end + NEAR_S

    rows = list(own)
    for worker in workers:
        rows += [(x.ts, "worker", x.render()) for x in ev.logs.context.get(worker, []) if near(x.ts, x.ts)]
    for f in ev.faults:
        if near(f.start, f.end or f.start):
            rows.append((f.start, "fault", f"{f.fault.kind} {f.fault.target} begins ({f.detail})"))
            rows.append((f.end or f.start, "fault", f"{f.fault.kind} {f.fault.target} ends"))
    rows.sort(key=lambda r: r[0])
    return [f"{_clock(at)} {source:<6} {text}" for at, source, text in rows]


def _client_rows(rec: RequestRecord) -> list[tuple[float, str, str]]:
    rows = [(at, "client", f"{rec.client} send {rec.rid} ({why})") for at, why in rec.sends]
    if rec.cancel_at is not None:
        rows.append((rec.cancel_at, "client", f"{rec.client} cancel {rec.rid}"))
    if rec.chunk_at is not None:
        rows.append((rec.chunk_at, "client", f"{rec.client} chunks of {rec.rid} begin ({len(rec.chunks)} seqs)"))
    for r in rec.finals:
        what = f"ok {r.text[:120]!r}" if r.ok else f"error {r.code}"
        rows.append((r.at, "client", f"{rec.client} final {rec.rid} from {r.worker} seq={r.seq} {what} [{r.digest}]"))
    return rows


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def by_kind(violations: Iterable[Violation]) -> dict[str, int]:
    return dict(Counter(v.kind for v in violations))
