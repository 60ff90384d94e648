"""Soak: a fake-engine worker at saturation for a while, RSS printed every interval; growth must stay < 5%.

    .venv/bin/python benchmarks/soak.py --minutes 30          # the full soak (not in CI)
    .venv/bin/python benchmarks/soak.py --minutes 2 --interval 20   # what tests/faults runs

Load: 64 concurrent clients asking in a loop over the embedded broker, new sessions all the time (so
session eviction and dedupe windows are exercised), plus one malformed message per loop. Memory is the
worker's process tree RSS. The first interval is warm-up; growth is measured from its end.
Exits 1 when growth >= 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import log as worker_log
from worker.client import Client
from worker.config import BrokerConfig, LogConfig


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def load(port: int, stop: asyncio.Event, counter: list[int]) -> None:
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as client:
        serial = itertools.count()

        async def loop(worker: int) -> None:
            while not stop.is_set():
                n = next(serial)
                reply = await client.ask("general", f"soak {n}", session=f"s{n % 5000}", timeout_s=60, retries=0)
                counter[0 if reply.ok else 1] += 1
                if n % 50 == worker:
                    await client._bus.publish("general/user_input", b'{"broken": ', wait=False)  # noqa: SLF001

        await asyncio.gather(*(loop(i) for i in range(64)))


async def main_async(minutes: float, interval_s: float) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "VLLM_WORKER_SESSIONS__MAX_SESSIONS": "1000",
        "VLLM_WORKER_WORKER__DEDUPE_MAX_ENTRIES": "2000",
        "VLLM_WORKER_LOG__LEVEL": "warning",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, read line by line below
        [
            sys.executable,
            "-m",
            "worker",
            "--engine",
            "fake",
            "--projects",
            "general",
            "--port",
            str(port),
            "--worker-id",
            "soak",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "vllm-worker: ready" in line:
            break
    # keep reading: a worker whose stderr pipe fills up blocks on its next log line
    threading.Thread(target=lambda: all(True for _ in proc.stderr), daemon=True).start()
    stop = asyncio.Event()
    counter = [0, 0]
    task = asyncio.create_task(load(port, stop, counter))
    started = time.monotonic()
    baseline = None
    samples = []
    try:
        while time.monotonic() - started < minutes * 60:
            await asyncio.sleep(interval_s)
            rss = tree_rss_mib(proc.pid)
            baseline = baseline or rss
            samples.append(rss)
            print(
                f"t={time.monotonic() - started:6.0f}s rss={rss:7.1f} MiB answers={counter[0]} errors={counter[1]}",
                flush=True,
            )
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()
    growth = (max(samples[1:] or samples) - baseline) / baseline if baseline else 0.0
    print(f"RSS growth after warm-up: {growth:.1%} (limit 5%); {counter[0]} answers, {counter[1]} errors")
    return 0 if growth < 0.05 and counter[0] > 0 else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--interval", type=float, default=60)
    args = p.parse_args()
    worker_log.setup(LogConfig(level="warning"))
    return asyncio.run(main_async(args.minutes, args.interval))


if __name__ == "__main__":
    sys.exit(main())
