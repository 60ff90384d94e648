"""Latency the Redis state backend adds per request, against the in-memory one (issue 15).

    .venv/bin/python benchmarks/state_latency.py [--requests 2000] [--concurrency 32] [--rounds 2]

One fake-engine worker (no token delay, so the MQTT + state path is all there is) on Mosquitto, with
`state.url` = memory, then a local redis-server, alternated `--rounds` times. Every request is a stateful
turn with a client-supplied requestId and a rate-limited project, so each one claims its requestId,
takes from two token buckets, locks its session, loads and appends history and caches its final reply.
Prints p50/p99 of end-to-end latency (publish -> final reply) per backend and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import free_port, mosquitto, pct, process

from worker.client import Client
from worker.config import BrokerConfig

PROJECT = "general"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def topics_dir() -> Path:
    """`general` with a (never reached) rate limit, so every request takes from its buckets."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-topics-"))
    text = (ROOT / "topics" / f"{PROJECT}.toml").read_text()
    limit = "\n[rate_limit]\nrequests_per_s = 1000000.0\nburst = 1000000\nproject_requests_per_s = 1000000.0\n"
    (tmp / f"{PROJECT}.toml").write_text(text + limit + "project_burst = 1000000\n")
    return tmp


async def one_round(port: int, state_url: str, topics: Path, requests: int, concurrency: int, tag: str) -> list[float]:
    env = {
        "VLLM_WORKER_STATE__URL": state_url,
        "VLLM_WORKER_WORKER__TOPICS_DIR": str(topics),
        "VLLM_WORKER_WORKER__MAX_INFLIGHT": "100000",
        "VLLM_WORKER_LOG__LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "worker", "--engine", "fake", "--projects", PROJECT, "--worker-id", f"state-{tag}"]
    cmd += ["--broker", f"mqtt://127.0.0.1:{port}"]
    with process(cmd, "vllm-worker: ready", env):
        return await timed_turns(port, requests, concurrency, tag)


async def timed_turns(port: int, requests: int, concurrency: int, tag: str) -> list[float]:
    """End-to-end ms of `requests` stateful turns with requestIds (64 sessions), after 200 untimed ones."""
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=f"bench-{tag}") as client:
        sem = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(i: int, *, record: bool) -> None:
            async with sem:
                started = time.perf_counter()
                reply = await client.ask(PROJECT, f"hello {i}", session=f"s{i % 64}", request_id=f"{tag}-{i}")
                if not reply.ok:
                    raise RuntimeError(f"request failed: {reply.error_code} {reply.error_message}")
                if record:
                    latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(one(-i - 1, record=False) for i in range(200)))  # warm-up, not counted
        await asyncio.gather(*(one(i, record=True) for i in range(requests)))
    return latencies


async def main_async(args: argparse.Namespace) -> None:
    topics = topics_dir()
    results: dict[str, list[float]] = {"memory": [], "redis": []}
    with mosquitto() as port, redis_server() as redis_url, Progress() as progress:
        task = progress.add_task("state latency", total=2 * args.rounds)
        for r in range(args.rounds):
            for backend, url in (("memory", "memory"), ("redis", redis_url)):
                progress.update(task, description=f"round {r + 1}: {backend}")
                results[backend] += await one_round(port, url, topics, args.requests, args.concurrency, f"{backend}{r}")
                progress.advance(task)
    shutil.rmtree(topics, ignore_errors=True)
    print(f"concurrency {args.concurrency}, {args.requests} requests x {args.rounds} rounds per backend")
    print(f"{'backend':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s-ish':>10}")
    for backend, lat in results.items():
        print(f"{backend:8} {pct(lat, 50):8.2f} {pct(lat, 99):8.2f} {args.concurrency * 1000 / pct(lat, 50):10.0f}")
    for p in (50, 99):
        print(f"added by redis at p{p}: {pct(results['redis'], p) - pct(results['memory'], p):+.2f} ms")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    asyncio.run(main_async(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
