"""CPU cost of one telemetry collection (NVML probe, process-tree RSS, engine stats, JSON), the upper
bound of what telemetry takes from serving at a given interval.

    .venv/bin/python benchmarks/telemetry_cost.py [--n 200]

Measures process CPU time (not wall time) around N collections in a worker Service with the fake engine
and a few live child processes, and reports the share of one core it costs at a 1 s interval.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.config import WorkerConfig
from worker.engine.fake import FakeEngine
from worker.projects import load_projects
from worker.service import Service


async def main_async(n: int) -> None:
    cfg = WorkerConfig.model_validate({"worker": {"projects": ["maze", "driving"], "id": "tele-cost"}})
    service = Service(cfg, load_projects("topics", cfg.worker.projects), FakeEngine())
    # a couple of children, like vLLM's engine core, so the process-tree walk has work to do
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]  # noqa: ASYNC220
    try:
        await service.telemetry()  # NVML init / first-call costs are not per-interval costs
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            (await service.telemetry()).to_json()
        cpu = (time.process_time() - cpu0) / n
        wall = (time.perf_counter() - wall0) / n
    finally:
        for k in kids:
            k.kill()
            k.wait()
    print(f"per collection: {cpu * 1000:.2f} ms CPU, {wall * 1000:.2f} ms wall")
    print(f"at a 1 s interval: {cpu * 100:.2f}% of one core; at the default 5 s: {cpu * 20:.3f}%")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    asyncio.run(main_async(p.parse_args().n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
