"""The benchmark's report code (benchmarks/runs.py, pyspy.py): min-max over runs and profile summaries."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from support import ROOT


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rep(worker_tok: float, serve_tok: float, worker_cpu: float) -> dict:
    def row(tok: float, ttft: float, cpu: dict[str, float]) -> dict:
        return {"concurrency": 32, "tok_per_s": tok, "ttft_ms_p99": ttft, "cpu_s_per_ktok": cpu}

    return {
        "arms": {
            "mosquitto": [row(worker_tok, 120.0, {"front-end": worker_cpu, "broker": 0.05, "client": 9.0})],
            "serve": [row(serve_tok, 100.0, {"front-end": 0.2, "client": 9.0})],
        }
    }


def test_targets_are_min_max_over_runs_and_skip_arms_that_did_not_run():
    runs = load("runs")
    table = runs.ranges([rep(90.0, 60.0, 0.25), rep(120.0, 60.0, 0.15)])
    assert table["worker/serve tok/s (target >= 1.0)"][32] == (1.5, 2.0)
    cpu = table["worker/serve front-end+broker CPU per ktok (target <= 1.0)"][32]
    assert round(cpu[0], 6) == 1.0
    assert round(cpu[1], 6) == 1.5
    assert not any("direct" in name for name in table)  # no direct arm: no direct ratios
    assert "1.50-2.00" in runs.markdown([rep(90.0, 60.0, 0.25), rep(120.0, 60.0, 0.15)])


def test_a_profile_summary_counts_threads_and_merges_lines_of_one_function(tmp_path: Path):
    pyspy = load("pyspy")
    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (11): MainThread;main (worker/cli/main.py:10);publish (paho/client.py:5) 30\n"
        "thread (11): MainThread;main (worker/cli/main.py:12);publish (paho/client.py:9) 10\n"
        "thread (12): paho-thread;loop (paho/client.py:1) 60\n"
    )
    summary = pyspy.summarize(raw)
    assert summary["samples"] == 100
    assert summary["threads"] == [("paho-thread", 60.0), ("MainThread", 40.0)]
    assert ("publish (paho/client.py)", 40.0) in summary["self"]
    assert ("main (worker/cli/main.py)", 40.0) in summary["inclusive"]
