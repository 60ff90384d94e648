"""The chaos run's report: counts, recovery, bounds and violations as text + JSON, and a timeline plot.

`chaos-<seed>-<minutes>m.{txt,json,png}` in the output folder. The text leads with what a reader needs to
decide (violations by kind, faults by kind, recovery time, memory and Redis bounds), then each violation
with its trace.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_checker import Violation, by_kind
from chaos_clients import RequestRecord, SessionRecord
from chaos_faults import KINDS, Injected


@dataclass
class Sample:
    """One periodic measurement (seconds since the load started)."""

    t: float
    rss_mib: dict[str, float]
    redis_keys: int | None


@dataclass
class Run:
    """Everything one run measured; `summary()` is the JSON report minus the series."""

    config: dict[str, Any]
    t0: float
    injected: list[Injected]
    requests: dict[str, RequestRecord]
    sessions: dict[str, SessionRecord]
    violations: list[Violation]
    samples: list[Sample]
    recovery: dict[str, Any]
    bounds: dict[str, Any]
    redis: dict[str, Any]
    workdir: str
    duration_s: float
    worker_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        sends = Counter(why.split()[0] for rec in self.requests.values() for _, why in rec.sends)
        finals = [r for rec in self.requests.values() for r in rec.finals]
        outcomes = Counter((o.code or "ok") if (o := rec.outcome()) else "none" for rec in self.requests.values())
        return {
            "sessions": len(self.sessions),
            "requests": len(self.requests),
            "sends": dict(sends),
            "retries": sum(n for why, n in sends.items() if why != "first"),
            "finals": len(finals),
            "final_codes": dict(Counter(r.code or "ok" for r in finals)),
            "outcomes": dict(outcomes),
            "resets": sum(1 for s in self.sessions.values() for kind, _ in s.steps if kind == "reset"),
            "cancels": sum(1 for rec in self.requests.values() if rec.cancel_at is not None),
            "gave_up": sum(1 for rec in self.requests.values() if rec.gave_up),
        }

    def faults_by_kind(self) -> dict[str, int]:
        got = Counter(i.fault.kind for i in self.injected if i.ok)
        return {kind: got.get(kind, 0) for kind in KINDS}

    def summary(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "duration_s": round(self.duration_s, 1),
            "faults_by_kind": self.faults_by_kind(),
            "faults": [i.to_json() for i in self.injected],
            "counts": self.counts(),
            "violations_by_kind": by_kind(self.violations),
            "violations": [v.to_json() for v in self.violations],
            "recovery": self.recovery,
            "bounds": self.bounds,
            "redis": self.redis,
            "worker_error_lines": self.worker_errors,
            "workdir": self.workdir,
            **self.extra,
        }

    def series(self) -> dict[str, list[float]]:
        """Per second since the load started: answers, error replies, timeouts (retries after silence)."""
        seconds = max(1, math.ceil(self.duration_s))
        ok, err, timeouts = [0.0] * seconds, [0.0] * seconds, [0.0] * seconds

        def bin_of(at: float) -> int | None:
            i = int(at - self.t0)
            return i if 0 <= i < seconds else None

        for rec in self.requests.values():
            first_ok = next((r for r in rec.finals if r.ok), None)
            if first_ok is not None and (i := bin_of(first_ok.at)) is not None:
                ok[i] += 1
            for r in rec.finals:
                if r.code is not None and (i := bin_of(r.at)) is not None:
                    err[i] += 1
            for at, why in rec.sends:
                if why == "timeout" and (i := bin_of(at)) is not None:
                    timeouts[i] += 1
        return {"answers_per_s": ok, "errors_per_s": err, "timeouts_per_s": timeouts}


def _stem(run: Run) -> str:
    minutes = run.config["minutes"]
    label = f"{minutes:g}"
    return f"chaos-{run.config['seed']}-{label}m"


def write(run: Run, out: Path) -> dict[str, Path]:
    """Write the text, JSON and PNG reports; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(run)
    paths = {"txt": out / f"{stem}.txt", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    data = run.summary()
    data["series"] = run.series()
    data["samples"] = [{"t": round(s.t, 1), "rss_mib": s.rss_mib, "redis_keys": s.redis_keys} for s in run.samples]
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["txt"].write_text(text(run))
    plot(run, paths["png"])
    return paths


def text(run: Run) -> str:
    """The human report (see module docstring)."""
    c, cfg = run.counts(), run.config
    lines = [
        (
            f"chaos run: seed {cfg['seed']}, {cfg['minutes']:g} min planned, {run.duration_s:.0f} s of load, "
            f"{cfg['workers']} workers ({cfg['engine']} engine), {cfg['clients']} clients"
        ),
        f"replay: {cfg['replay']}",
        f"work dir (events.jsonl, worker logs): {run.workdir}",
        "",
        f"VIOLATIONS: {len(run.violations)}" + (f"  {by_kind(run.violations)}" if run.violations else ""),
        "",
        "faults injected: " + ", ".join(f"{k} {n}" for k, n in run.faults_by_kind().items()),
        *(f"FAULT NOT INJECTED: {i.fault.describe()}: {i.detail}" for i in run.injected if not i.ok),
        (
            f"requests {c['requests']} in {c['sessions']} sessions; finals {c['finals']}; retries {c['retries']} "
            f"{ {k: v for k, v in c['sends'].items() if k != 'first'} }"
        ),
        f"outcomes {c['outcomes']}; resets {c['resets']}; cancels {c['cancels']}; gave up {c['gave_up']}",
        f"final replies by code {c['final_codes']}",
        "",
    ]
    rec = run.recovery
    per_worker = ", ".join(f"{w} {s:.1f}s" if s is not None else f"{w} NEVER" for w, s in rec["per_worker_s"].items())
    lines += [
        (
            f"after the last fault (ended at +{rec['last_fault_end_s']:.1f}s): first answer in "
            f"{_s(rec['fleet_s'])}; every worker answering again within {_s(rec['all_workers_s'])} "
            f"(bound {rec['bound_s']:.0f}s): {per_worker}"
        ),
        "max RSS per worker (MiB): "
        + ", ".join(f"{w} {m:.0f}" for w, m in run.bounds["max_rss_mib"].items())
        + f" (bound {run.bounds['rss_bound_mib']})",
        (
            f"Redis keys: max {run.redis['max_keys']}, at the end {run.redis['final_keys']} "
            f"(bound {run.redis['bound']}); keys without TTL: {run.redis['no_ttl']}"
        ),
        f"worker log lines at error level: {run.worker_errors}",
    ]
    for v in run.violations:
        lines += ["", f"--- {v.kind}: {v.subject}: {v.summary}", *(f"  {row}" for row in v.trace)]
    return "\n".join(lines) + "\n"


def _s(value: float | None) -> str:
    return "NEVER" if value is None else f"{value:.1f}s"


COLORS = {
    "worker_kill": "tab:red",
    "worker_term": "tab:orange",
    "worker_stop": "tab:purple",
    "mosquitto_restart": "tab:blue",
    "redis_stop": "tab:green",
    "redis_restart": "tab:olive",
    "connection_drop": "tab:brown",
}


def plot(run: Run, path: Path) -> None:
    """Three panels on one time axis: answers and errors per second, fault lanes, RSS and Redis keys."""
    import matplotlib as mpl  # noqa: PLC0415 - only when a report is written

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = run.series()
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(14, 9), sharex=True, height_ratios=[3, 2, 2])
    xs = list(range(len(series["answers_per_s"])))
    ax1.plot(xs, _smooth(series["answers_per_s"]), label="answers/s (5 s mean)", color="tab:blue")
    ax1.plot(xs, _smooth(series["errors_per_s"]), label="error replies/s", color="tab:red")
    ax1.plot(xs, _smooth(series["timeouts_per_s"]), label="timeouts/s", color="tab:gray")
    for v in run.violations:
        at = _violation_at(run, v)
        if at is not None:
            ax1.axvline(at, color="black", linestyle=":", linewidth=0.8)
    ax1.set_ylabel("per second")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"chaos seed {run.config['seed']}: {len(run.violations)} violation(s) (dotted: where)")
    targets = sorted({i.fault.target for i in run.injected})
    for row, target in enumerate(targets):
        for i in (i for i in run.injected if i.fault.target == target):
            start = i.start - run.t0
            width = max(0.5, (i.end or i.start) - i.start)
            ax2.broken_barh([(start, width)], (row - 0.4, 0.8), color=COLORS.get(i.fault.kind, "black"))
    ax2.set_yticks(range(len(targets)), targets)
    handles = [mpl.patches.Patch(color=color, label=kind) for kind, color in COLORS.items()]
    ax2.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    ax2.set_ylabel("faults")
    workers = sorted({w for s in run.samples for w in s.rss_mib})
    for worker in workers:
        ax3.plot([s.t for s in run.samples], [s.rss_mib.get(worker, 0) for s in run.samples], label=worker)
    ax3.set_ylabel("RSS MiB")
    ax3.legend(loc="upper left", fontsize=8)
    keys = ax3.twinx()
    keyed = [s for s in run.samples if s.redis_keys is not None]
    keys.plot([s.t for s in keyed], [s.redis_keys for s in keyed], color="black", linestyle="--", label="Redis keys")
    keys.set_ylabel("Redis keys")
    keys.legend(loc="upper right", fontsize=8)
    ax3.set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _violation_at(run: Run, v: Violation) -> float | None:
    rec = run.requests.get(v.subject)
    if rec is None or not rec.sends:
        return None
    return rec.sends[0][0] - run.t0
