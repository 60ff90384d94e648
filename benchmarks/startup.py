"""Start-up: the bare vLLM engine vs the whole worker, each from process start, side by side.

    .venv/bin/python benchmarks/startup.py [--runs 2] [--compile]

(a) bare: a fresh interpreter imports vLLM and builds AsyncLLM with the worker's engine settings;
(b) worker: `python -m worker` until it prints "ready" (embedded broker, pre-flight, engine, subscribe).
`--compile` adds (c): the bare engine with vLLM's default torch.compile path (what the worker avoids on CPU).
Writes benchmarks/results/startup.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
BARE = """
import time, sys
t0 = float(sys.argv[1])
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
if __name__ == "__main__":
    eager = sys.argv[3] == "eager"
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[2], enforce_eager=eager, max_model_len=2048))
    print(f"READY {time.time() - t0:.2f}", flush=True)
    llm.shutdown()
"""
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def bare(mode: str) -> float:
    script = ROOT / "benchmarks" / "results" / "_bare_engine.py"
    script.write_text(BARE)
    out = subprocess.run(
        [sys.executable, str(script), str(time.time()), str(MODEL), mode],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        check=True,
    )
    return float(next(line for line in out.stdout.splitlines() if line.startswith("READY")).split()[1])


def worker() -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--port", str(port), "--worker-id", "startup-bench", "--projects", "maze"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "vllm-worker: ready" in line:
                return time.time() - started
        raise RuntimeError("worker exited before ready")
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time vLLM's default torch.compile start")
    args = p.parse_args()
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    arms = {"bare engine (eager)": lambda: bare("eager"), "worker to ready": worker}
    if args.compile:
        arms["bare engine (torch.compile, vLLM default)"] = lambda: bare("compile")
    results: dict[str, list[float]] = {name: [] for name in arms}
    with Progress() as progress:
        task = progress.add_task("start-up runs", total=args.runs * len(arms))
        for _ in range(args.runs):
            for name, run in arms.items():  # interleaved, so drift hits every arm alike
                if "compile" in name and results[name]:
                    progress.advance(task)
                    continue  # ~110 s each: once is enough
                results[name].append(run())
                progress.advance(task)
    summary = {name: {"runs_s": v, "median_s": statistics.median(v)} for name, v in results.items()}
    ratio = summary["worker to ready"]["median_s"] / summary["bare engine (eager)"]["median_s"]
    report = {"machine": f"{os.cpu_count()} cores", "arms": summary, "worker_over_bare": round(ratio, 3)}
    (ROOT / "benchmarks" / "results" / "startup.json").write_text(json.dumps(report, indent=2))
    print("| arm | runs (s) | median (s) |\n|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in row['runs_s'])} | {row['median_s']:.1f} |")
    print(f"\nworker / bare engine = {ratio:.3f} (target <= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
