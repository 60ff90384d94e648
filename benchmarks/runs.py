"""Issue 16's targets over several benchmark runs, each figure as min-max (`bench --runs N`).

One run's ratios move with the 2-core machine's noise; the README reports the range of N runs, each
run measuring every arm side by side. A figure whose arms were not run is left out.
"""

from __future__ import annotations

from typing import Any

WORKER = "mosquitto"  # the production path: the worker behind Mosquitto


def level_row(arms: dict[str, list[dict[str, Any]]], arm: str, conc: int) -> dict[str, Any] | None:
    """One arm's summary at one concurrency (None where that arm or level did not run)."""
    return next((r for r in arms.get(arm, []) if r["concurrency"] == conc), None)


def _front_cpu(row: dict[str, Any]) -> float:
    """Front-end + broker CPU-seconds per 1,000 tokens (what a GPU host pays on its CPUs)."""
    cpu = row.get("cpu_s_per_ktok", {})
    return float(cpu.get("front-end", 0.0)) + float(cpu.get("broker", 0.0))


FIGURES = {
    "worker/serve tok/s (target >= 1.0)": ("serve", lambda w, o: w["tok_per_s"] / o["tok_per_s"]),
    "worker/direct tok/s (target >= 0.9 at 32)": ("direct", lambda w, o: w["tok_per_s"] / o["tok_per_s"]),
    "worker/direct TTFT p99 (target <= 1.5)": ("direct", lambda w, o: w["ttft_ms_p99"] / o["ttft_ms_p99"]),
    "worker/serve front-end+broker CPU per ktok (target <= 1.0)": ("serve", lambda w, o: _front_cpu(w) / _front_cpu(o)),
    "worker/serve-mp0 tok/s (target >= 0.95)": ("serve-mp0", lambda w, o: w["tok_per_s"] / o["tok_per_s"]),
    "worker/serve-mp0 front-end+broker CPU per ktok": ("serve-mp0", lambda w, o: _front_cpu(w) / _front_cpu(o)),
}


def ranges(reps: list[dict[str, Any]]) -> dict[str, dict[int, tuple[float, float]]]:
    """figure -> concurrency -> (min, max) over the runs that measured both arms."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    levels = sorted({r["concurrency"] for rep in reps for r in rep["arms"].get(WORKER, [])})
    for name, (other, ratio) in FIGURES.items():
        for conc in levels:
            values = []
            for rep in reps:
                w, o = level_row(rep["arms"], WORKER, conc), level_row(rep["arms"], other, conc)
                if w and o:
                    try:
                        values.append(ratio(w, o))
                    except ZeroDivisionError:
                        continue
            if values:
                out.setdefault(name, {})[conc] = (min(values), max(values))
    return out


def markdown(reps: list[dict[str, Any]]) -> str:
    """The targets table: one row per figure, one column per concurrency, `min-max` of the runs."""
    table = ranges(reps)
    if not table:
        return ""
    levels = sorted({c for per in table.values() for c in per})
    lines = [
        f"Issue 16 targets over {len(reps)} run(s), min-max (worker = the `{WORKER}` arm):",
        "",
        "| figure | " + " | ".join(f"c{c}" for c in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name, per in table.items():
        cells = [f"{per[c][0]:.2f}-{per[c][1]:.2f}" if c in per else "-" for c in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
