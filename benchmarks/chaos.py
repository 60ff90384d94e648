"""Chaos run: a fleet under load while faults are injected at random, then a checker judges what happened.

    .venv/bin/python benchmarks/chaos.py --minutes 20 --seed 1234        # the long run (reports kept)
    .venv/bin/python benchmarks/chaos.py --short --seed 7 --out /tmp/c   # what tests/faults/test_chaos.py runs
    .venv/bin/python benchmarks/chaos.py --engine vllm --minutes 10      # real engine (no history oracle)
    .venv/bin/python benchmarks/chaos.py --seed 1234 --minutes 20 --worker-src /tmp/old  # the same run, older code

3 workers (fake engine, history oracle) in one share group, Mosquitto and Redis on loopback, each worker's
broker connection through a TCP proxy this run owns. 16-64 clients run multi-turn v2 sessions with
streams, same-requestId retries (after silence, after transient errors, on purpose), cancels and resets
(`chaos_clients`). A seeded schedule (`chaos_faults`, printed) kills, terminates and pauses workers,
restarts Mosquitto and Redis, pauses Redis and drops worker connections. Afterwards `chaos_checker` judges
every requestId and session; the report (`chaos_report`) lands in --out. Exit 1 on any violation.
The same seed replays the same schedule and the same client choices (timing is the machine's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos_checker import Evidence, Violation, check
from chaos_clients import ChaosClient, Load, Records
from chaos_faults import Durations, Fault, Injector, plan
from chaos_fleet import Fleet, WorkerSpec
from chaos_logs import read_logs
from chaos_report import Run, Sample, text, write
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from worker import log as worker_log
from worker.config import LogConfig, WorkerConfig

WARMUP_S = 5.0
SAMPLE_EVERY_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="replays a run (default: a fresh one, printed)")
    p.add_argument("--minutes", type=float, default=5.0, help="load duration with faults (plus settling)")
    p.add_argument("--short", action="store_true", help="the CI variant: 1.25 min, 16 clients, shorter pauses")
    p.add_argument("--clients", type=int, default=None, help="16-64 (default 32; 16 with --short)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--engine", choices=["fake", "vllm"], default="fake")
    p.add_argument("--model", default=None, help="with --engine vllm: the model directory")
    p.add_argument("--worker-src", type=Path, default=ROOT, help="run the `worker` package of this source tree")
    p.add_argument("--faults-per-kind", type=int, default=None, help="default: about one per kind per 2 minutes")
    p.add_argument("--settle-s", type=float, default=None, help="load kept on after the last fault ended")
    p.add_argument("--recovery-bound-s", type=float, default=60.0, help="every worker answers within this")
    p.add_argument("--rss-bound-mib", type=float, default=None, help="per worker (default 400 fake, off vllm)")
    p.add_argument("--token-delay-s", type=float, default=0.05, help="fake engine: seconds per word")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 200 fake, 32 vllm)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--keep", action="store_true", help="keep the work dir (events.jsonl, worker logs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.short:
        args.minutes = 1.25 if args.minutes == p.get_default("minutes") else args.minutes
        args.clients = args.clients or 16
    args.clients = args.clients or 32
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(3), "big")
    if args.faults_per_kind is None:
        args.faults_per_kind = max(1, math.ceil(args.minutes * 0.55))
    if args.settle_s is None:
        args.settle_s = 15.0 if args.minutes < 5 else 30.0
    if args.max_tokens is None:
        args.max_tokens = 200 if args.engine == "fake" else 32
    if args.rss_bound_mib is None:
        args.rss_bound_mib = 400.0 if args.engine == "fake" else 0.0
    return args


def replay_command(args: argparse.Namespace) -> str:
    cmd = f"python benchmarks/chaos.py --seed {args.seed} --minutes {args.minutes:g} --clients {args.clients}"
    cmd += " --short" if args.short else ""
    cmd += f" --engine {args.engine}" if args.engine != "fake" else ""
    cmd += f" --faults-per-kind {args.faults_per_kind} --settle-s {args.settle_s:g}"
    cmd += f" --token-delay-s {args.token_delay_s:g} --max-tokens {args.max_tokens}"
    cmd += f" --worker-src {args.worker_src}" if args.worker_src != ROOT else ""
    return cmd


async def sampler(fleet: Fleet, t0: float, samples: list[Sample], stop: asyncio.Event) -> None:
    """RSS of every worker and Redis' key count, every SAMPLE_EVERY_S (bounded: ~1 KiB a sample)."""
    while not stop.is_set():
        rss = {slot.id: round(slot.sample_rss(), 1) for slot in fleet.slots}
        samples.append(Sample(time.monotonic() - t0, rss, await fleet.redis_keys()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


@dataclass
class Measured:
    """What `_drive` measured while the fleet was up."""

    t0: float
    injector: Injector
    samples: list[Sample]
    duration_s: float
    final_keys: int | None
    no_ttl: tuple[int, list[str]]
    max_rss: dict[str, float]
    log_paths: dict[str, Path]
    restarts: dict[str, int]


async def run_chaos(args: argparse.Namespace, workdir: Path) -> Run:
    """Plan, run the fleet under load and faults, then judge."""
    durations = Durations(worker_stop=(5.0, 10.0)) if args.short else Durations()
    load_s = args.minutes * 60
    worker_ids = [f"chaos-w{i}" for i in range(args.workers)]
    end_s = max(WARMUP_S + 10, load_s - args.settle_s)
    faults = plan(args.seed, WARMUP_S, end_s, args.faults_per_kind, worker_ids, durations)
    print(f"chaos: seed {args.seed}; replay: {replay_command(args)}", flush=True)
    print(f"chaos: {len(faults)} faults planned (seconds after the load starts):", flush=True)
    for fault in faults:
        print(f"  {fault.describe()}", flush=True)
    records = Records(workdir / "events.jsonl")
    spec = WorkerSpec(
        engine=args.engine,
        token_delay_s=args.token_delay_s,
        model=args.model,
        src=args.worker_src,
        ready_timeout_s=120.0 if args.engine == "fake" else 900.0,
    )
    async with Fleet(workdir, args.workers, spec) as fleet:
        print(f"chaos: fleet ready in {workdir} (broker {fleet.broker_url}, redis {fleet.redis.url})", flush=True)
        measured = await _drive(args, fleet, faults, records)
    records.close()
    return _judge(args, faults, records, measured, workdir)


async def _drive(args: argparse.Namespace, fleet: Fleet, faults: list[Fault], records: Records) -> Measured:
    """Clients, faults and sampling until the planned time is over and the fleet settled after the last fault;
    then the turns in flight finish (each bounded by the client's patience)."""
    load = Load(clients=args.clients, max_tokens=args.max_tokens, give_up_s=90.0 if args.short else 180.0)
    t0_wall, t0 = time.time(), time.monotonic()
    stop_new, stop_sampler = asyncio.Event(), asyncio.Event()
    clients = [ChaosClient(i, fleet.broker_url, args.seed, load, records) for i in range(args.clients)]
    client_tasks = [asyncio.create_task(c.run(stop_new)) for c in clients]
    injector = Injector(fleet, faults)
    inject_task = asyncio.create_task(injector.run(t0))
    samples: list[Sample] = []
    sample_task = asyncio.create_task(sampler(fleet, t0, samples, stop_sampler))
    await _watch(args, t0, clients, injector, inject_task)
    stop_new.set()
    print("chaos: load over; waiting for the turns in flight", flush=True)
    await asyncio.wait(client_tasks, timeout=load.give_up_s + 30)
    await asyncio.sleep(3.0)  # late and duplicate replies still land in the records
    for task in client_tasks:
        task.cancel()
    await asyncio.gather(*client_tasks, return_exceptions=True)
    stop_sampler.set()
    await sample_task
    return Measured(
        t0=t0_wall,
        injector=injector,
        samples=samples,
        duration_s=time.time() - t0_wall,
        final_keys=await fleet.redis_keys(),
        no_ttl=await fleet.keys_without_ttl(),
        max_rss={slot.id: round(slot.max_rss_mib, 1) for slot in fleet.slots},
        log_paths={slot.id: slot.log_path for slot in fleet.slots},
        restarts={slot.id: slot.restarts for slot in fleet.slots},
    )


async def _watch(
    args: argparse.Namespace, t0: float, clients: list[ChaosClient], injector: Injector, inject_task: asyncio.Task[None]
) -> None:
    """Progress (a bar on a terminal, a line every 30 s otherwise) until the load phase is over."""
    load_s = args.minutes * 60
    with _progress(args) as progress:
        bar = progress.add_task("chaos", total=load_s, status="")
        next_line = 0.0
        while True:
            elapsed = time.monotonic() - t0
            settled = inject_task.done() and time.time() >= injector.last_end() + args.settle_s
            if elapsed >= load_s and settled:
                break
            turns = sum(c.turns for c in clients)
            status = f"turns {turns} faults {len(injector.injected)}/{len(injector.faults)} (active {injector.active})"
            progress.update(bar, completed=min(elapsed, load_s), status=status)
            if progress.disable and elapsed >= next_line:
                print(f"chaos: +{elapsed:4.0f}s {status}", flush=True)
                next_line += 30
            await asyncio.sleep(1.0)
        progress.update(bar, completed=load_s)


def _judge(args: argparse.Namespace, faults: list[Fault], records: Records, m: Measured, workdir: Path) -> Run:
    """Run the checker and the bound checks; assemble the report's data."""
    logs = read_logs(m.log_paths)
    injected = m.injector.injected
    evidence = Evidence(
        records.requests, records.sessions, logs, injected, resets=records.resets, oracle=args.engine == "fake"
    )
    violations = check(evidence)
    worker_ids = list(m.log_paths)
    recovery = _recovery(m.injector.last_end(), m.t0, logs.done_times, worker_ids, args.recovery_bound_s)
    no_ttl, no_ttl_names = m.no_ttl
    violations += _bound_violations(recovery, m.max_rss, args.rss_bound_mib, no_ttl, no_ttl_names, m.samples)
    cfg = WorkerConfig()
    key_bound = cfg.worker.dedupe_max_entries + 4 * cfg.sessions.max_sessions + 1000
    max_keys = max((s.redis_keys for s in m.samples if s.redis_keys is not None), default=0)
    if max_keys > key_bound:
        violations.append(Violation("redis_keys", "redis", f"{max_keys} keys > bound {key_bound}"))
    config: dict[str, Any] = {
        "seed": args.seed,
        "minutes": args.minutes,
        "clients": args.clients,
        "workers": args.workers,
        "engine": args.engine,
        "faults_per_kind": args.faults_per_kind,
        "short": args.short,
        "replay": replay_command(args),
        "worker_src": str(args.worker_src),
        "planned": [f.describe() for f in faults],
    }
    return Run(
        config=config,
        t0=m.t0,
        injected=injected,
        requests=records.requests,
        sessions=records.sessions,
        violations=violations,
        samples=m.samples,
        recovery=recovery,
        bounds={"max_rss_mib": m.max_rss, "rss_bound_mib": args.rss_bound_mib},
        redis={"max_keys": max_keys, "final_keys": m.final_keys, "bound": key_bound, "no_ttl": no_ttl},
        workdir=str(workdir),
        duration_s=m.duration_s,
        worker_errors=logs.errors,
        extra={"restarts": m.restarts, "redis_no_ttl_sample": no_ttl_names},
    )


def _recovery(
    last_end: float, t0: float, done: dict[str, list[float]], workers: list[str], bound_s: float
) -> dict[str, Any]:
    """Seconds from the end of the last fault until each worker finished a request again."""
    per_worker: dict[str, float | None] = {}
    for worker in workers:
        after = [t for t in done.get(worker, []) if t >= last_end]
        per_worker[worker] = round(min(after) - last_end, 2) if after else None
    answered = [s for s in per_worker.values() if s is not None]
    return {
        "last_fault_end_s": round(last_end - t0, 1) if last_end else 0.0,
        "fleet_s": min(answered) if answered else None,
        "all_workers_s": max(answered) if len(answered) == len(workers) else None,
        "per_worker_s": per_worker,
        "bound_s": bound_s,
    }


def _bound_violations(
    recovery: dict[str, Any],
    max_rss: dict[str, float],
    rss_bound: float,
    no_ttl: int,
    no_ttl_names: list[str],
    samples: list[Sample],
) -> list[Violation]:
    out = []
    for worker, seconds in recovery["per_worker_s"].items():
        if seconds is None or seconds > recovery["bound_s"]:
            late = "never" if seconds is None else f"only after {seconds:.1f}s"
            out.append(Violation("worker_stuck", worker, f"answered {late} after the last fault"))
    for worker, rss in max_rss.items():
        if rss_bound and rss > rss_bound:
            out.append(Violation("rss", worker, f"max RSS {rss:.0f} MiB > bound {rss_bound:.0f} MiB"))
    if no_ttl:
        out.append(Violation("key_without_ttl", "redis", f"{no_ttl} keys without a TTL, e.g. {no_ttl_names[:5]}"))
    if not samples:
        out.append(Violation("no_samples", "run", "no RSS / Redis samples were taken"))
    return out


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Any:
    show = not args.no_progress and sys.stdout.isatty()
    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, TextColumn("{task.fields[status]}"), disable=not show) as progress:
        yield progress


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    worker_log.setup(LogConfig(level="warning"))  # the clients' own bus lines would drown the progress
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-"))
    run = asyncio.run(run_chaos(args, workdir))  # on a crash the work dir stays, for the post-mortem
    if not (args.keep or run.violations):  # a violation's full event log and worker logs are kept
        shutil.rmtree(workdir, ignore_errors=True)
        run.workdir = "(removed: no violation; --keep keeps it)"
    paths = write(run, args.out)
    report = text(run)
    head, _, rest = report.partition("\n--- ")
    print(head, flush=True)
    if rest:
        shown = ("--- " + rest)[:20000]
        print(shown, flush=True)
    print(f"chaos: reports {', '.join(str(p) for p in paths.values())}", flush=True)
    missing = [k for k, n in run.faults_by_kind().items() if n == 0]
    if missing:
        print(f"chaos: fault kinds never injected: {missing}", flush=True)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
