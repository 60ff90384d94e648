"""The chaos run's faults: a schedule drawn from the seed up front (printed, so a run can be replayed), then
injected on time.

Kinds are drawn in shuffled rounds (every kind once per round), so a short run still meets each kind and a
long one meets each about equally often. Faults on one target (a worker, Mosquitto, Redis) run one after
the other; faults on different targets overlap, which is where the interesting interleavings are. A fault
ends once its target is back: a killed worker restarted and ready, a paused process resumed, a restarted
server listening again.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos_fleet import Fleet, WorkerSlot, wait_port

KINDS = (
    "worker_kill",
    "worker_term",
    "worker_stop",
    "mosquitto_restart",
    "redis_stop",
    "redis_restart",
    "connection_drop",
)
WORKER_KINDS = frozenset({"worker_kill", "worker_term", "worker_stop", "connection_drop"})


@dataclass(frozen=True)
class Fault:
    """One planned fault: when (seconds after the load started), what, on which target, for how long."""

    at_s: float
    kind: str
    target: str
    duration_s: float = 0.0

    def describe(self) -> str:
        hold = f" for {self.duration_s:.1f}s" if self.duration_s else ""
        return f"t={self.at_s:7.1f}s {self.kind:<17} {self.target}{hold}"


@dataclass
class Injected:
    """What actually happened: wall-clock start and end (target back), and a detail line."""

    fault: Fault
    start: float
    end: float = 0.0
    detail: str = ""
    ok: bool = True
    """False when the injection itself failed (not counted as injected)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.fault), "start": self.start, "end": self.end, "detail": self.detail, "ok": self.ok}


@dataclass(frozen=True)
class Durations:
    """Ranges (seconds) the schedule draws from."""

    worker_stop: tuple[float, float] = (5.0, 20.0)
    redis_stop: tuple[float, float] = (0.5, 5.0)
    server_down: tuple[float, float] = (0.2, 2.0)


def plan(
    seed: int,
    start_s: float,
    end_s: float,
    per_kind: int,
    workers: list[str],
    durations: Durations | None = None,
) -> list[Fault]:
    """`per_kind` faults of every kind spread over [start_s, end_s], reproducible from `seed`."""
    rng = random.Random(seed)  # noqa: S311 - seeded on purpose: a run replays
    d = durations or Durations()
    kinds: list[str] = []
    for _ in range(per_kind):
        round_ = list(KINDS)
        rng.shuffle(round_)
        kinds += round_
    gap = (end_s - start_s) / max(1, len(kinds))
    faults = []
    for i, kind in enumerate(kinds):
        at = start_s + gap * (i + rng.uniform(0.0, 0.8))
        if kind in WORKER_KINDS:
            target = rng.choice(workers)
        else:
            target = "mosquitto" if kind.startswith("mosquitto") else "redis"
        hold = {"worker_stop": d.worker_stop, "redis_stop": d.redis_stop}.get(kind)
        if kind in {"mosquitto_restart", "redis_restart"}:
            hold = d.server_down
        duration = round(rng.uniform(*hold), 2) if hold else 0.0
        faults.append(Fault(round(at, 2), kind, target, duration))
    return faults


@dataclass
class Injector:
    """Runs a plan against a fleet; `injected` is the record the report and the checker read."""

    fleet: Fleet
    faults: list[Fault]
    injected: list[Injected] = field(default_factory=list)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def active(self) -> int:
        """Faults in progress now."""
        return len(self._running)

    async def run(self, t0: float) -> None:
        """Inject every fault at its time (monotonic `t0` + at_s); returns once all have ended."""
        for fault in self.faults:
            delay = t0 + fault.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(fault))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        while self._running:
            await asyncio.gather(*list(self._running))

    def last_end(self) -> float:
        """Wall clock at which the last fault ended (its target back)."""
        return max((i.end for i in self.injected), default=0.0)

    async def _one(self, fault: Fault) -> None:
        lock = self._locks.setdefault(fault.target, asyncio.Lock())
        async with lock:
            record = Injected(fault, time.time())
            self.injected.append(record)
            try:
                record.detail = await self._inject(fault)
            except Exception as exc:  # noqa: BLE001 - a failed injection is reported, never fatal
                record.detail = f"injection failed: {type(exc).__name__}: {exc}"
                record.ok = False
            record.end = time.time()

    def _slot(self, target: str) -> WorkerSlot:
        return next(s for s in self.fleet.slots if s.id == target)

    async def _inject(self, fault: Fault) -> str:
        kind, f = fault.kind, self.fleet
        if kind in {"worker_kill", "worker_term"}:
            slot = self._slot(fault.target)
            before = slot.incarnation
            slot.signal(signal.SIGCONT)
            slot.signal(signal.SIGKILL if kind == "worker_kill" else signal.SIGTERM)
            async with asyncio.timeout(60):
                await slot.wait_incarnation(before + 1)  # the supervisor restarts it
            if not await slot.wait_ready():
                raise RuntimeError(f"incarnation {slot.incarnation} not ready")
            return f"restarted as incarnation {slot.incarnation}"
        if kind == "worker_stop":
            slot = self._slot(fault.target)
            slot.signal(signal.SIGSTOP)
            await asyncio.sleep(fault.duration_s)
            slot.signal(signal.SIGCONT)
            return "stopped, then continued"
        if kind == "connection_drop":
            return f"closed {self._slot(fault.target).proxy.drop()} connection(s)"
        server = f.mosquitto if fault.target == "mosquitto" else f.redis
        if kind == "redis_stop":
            server.pause()
            await asyncio.sleep(fault.duration_s)
            server.resume()
            return "stopped, then continued"
        await server.stop()
        await asyncio.sleep(fault.duration_s)
        await server.start()
        await wait_port(server.port)
        return "restarted on the same port and data"
