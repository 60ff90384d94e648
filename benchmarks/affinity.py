"""Session affinity on real engines: does turn N find turn N-1's KV cache? (issue 30)

    .venv/bin/python benchmarks/affinity.py [--sessions 24] [--turns 8] [--arms sticky,shared]
                                            [--think-s 0] [--block-size N]

Two real-engine workers (demo model) on Mosquitto + Redis in one share group; on a 2-core machine each
is pinned to its own core (`taskset`, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, one OpenMP thread). N sessions
of M turns each, a ~300-token system prompt and a growing history, run concurrently (one turn in flight
per session). Arm "sticky": the Python client with affinity; arm "shared": without (every turn through
the share group). Both arms run in one invocation, against the same workers, with fresh session ids.
`--think-s S`: each turn waits a seeded random think time (exponential, mean S) before it is sent, as a
person or a robot between turns (without it, every session sends its next turn the moment its answer
arrives, and each worker's sessions move in lockstep waves). `--block-size N`: the engines' KV-cache block
size (`model.block_size`; vLLM's CPU default 128 caches a conversation only in whole 128-token blocks).
Reports for turns 4..M: cachedTokens/promptTokens per request, TTFT p50/p99 (the worker's own timing),
and overall requests/s and requests served per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import mosquitto, pct, process
from state_latency import redis_server

from worker.client import Client
from worker.config import BrokerConfig

SYSTEM = (
    "You are the navigator of a small robot that explores a maze made of square cells. Each turn the robot "
    "reports what its sensors see: walls, openings, distances to the nearest wall in each direction, and "
    "the marks it left on the floor. You answer with exactly one move (forward, left, right or back) and "
    "one short sentence that explains why. Prefer unexplored openings; never send the robot into a wall it "
    "reported; when two openings look equally good, prefer the one on the left; when the robot is stuck in "
    "a dead end, tell it to turn back and follow the left wall; remember the marks it reported in earlier "
    "turns and do not send it down a corridor it already marked as explored. Keep every answer under twenty "
    "words, use plain language, and do not repeat the robot's report back to it. "
) * 2


@contextlib.contextmanager
def workers(broker_port: int, redis_url: str, cores: list[int], block_size: int | None) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for i, core in enumerate(cores):
            env = {
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "OMP_NUM_THREADS": "1",
                "VLLM_CPU_OMP_THREADS_BIND": str(core),
                "VLLM_WORKER_STATE__URL": redis_url,
                "VLLM_WORKER_LOG__LEVEL": "warning",
                "VLLM_WORKER_WORKER__MAX_INFLIGHT": "1024",
                **({"VLLM_WORKER_MODEL__BLOCK_SIZE": str(block_size)} if block_size else {}),
            }
            cmd = ["taskset", "-c", str(core), sys.executable, "-m", "worker", "--broker"]
            cmd += [f"mqtt://127.0.0.1:{broker_port}", "--worker-id", f"aff-{i}", "--projects", "general"]
            cmd += ["--max-model-len", "2048"]
            stack.enter_context(process(cmd, "vllm-worker: ready", env))
        yield


async def conversation(c: Client, session: str, turns: int, out: list[dict], think_s: float) -> None:
    rng = random.Random(session)  # noqa: S311 - a reproducible think time, not a secret
    for turn in range(1, turns + 1):
        if think_s:
            await asyncio.sleep(rng.expovariate(1 / think_s))
        reply = await c.ask(
            "general",
            # each conversation its own words: identical ones would share their cache across sessions
            f"Robot {session} at step {turn}: wall ahead, opening on the left. Which way?",
            session=session,
            systemPrompt=SYSTEM,
            maxTokens=24,
            temperature=0,
            timeout_s=600,
            retries=0,
        )
        usage, timing = reply.raw.get("usage", {}), reply.raw.get("timing", {})
        out.append(
            {
                "turn": turn,
                "ok": reply.ok,
                "worker": reply.raw.get("worker"),
                "prompt": usage.get("promptTokens", 0),
                "cached": usage.get("cachedTokens", 0),
                "ttft": timing.get("ttftMs", 0),
                "invited": "affinity" in reply.raw,
                "session": session,
            }
        )


async def arm(port: int, name: str, sessions: int, turns: int, think_s: float = 0.0) -> dict:
    out: list[dict] = []
    async with Client(
        BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=f"bench-{name}", affinity=name == "sticky"
    ) as c:
        await c.wait_for_worker("general", 600)
        started = time.perf_counter()
        await asyncio.gather(*(conversation(c, f"{name}-{i}", turns, out, think_s) for i in range(sessions)))
        wall = time.perf_counter() - started
    late = [r for r in out if r["turn"] >= 4 and r["ok"]]
    ratios = [r["cached"] / r["prompt"] for r in late if r["prompt"]]
    per_worker = Counter(r["worker"] for r in out)
    by_session: dict[str, list[dict]] = {}
    for r in sorted(out, key=lambda r: r["turn"]):
        by_session.setdefault(r["session"], []).append(r)
    pairs = [pair for turns_ in by_session.values() for pair in itertools.pairwise(turns_)]
    return {
        "arm": name,
        "requests": len(out),
        "errors": sum(not r["ok"] for r in out),
        "req_per_s": len(out) / wall,
        "reuse_mean": statistics.mean(ratios) if ratios else 0.0,
        "prefill_mean": statistics.mean(r["prompt"] - r["cached"] for r in late) if late else 0.0,
        "reuse_min": min(ratios) if ratios else 0.0,
        "ttft_p50": pct([r["ttft"] for r in late], 50),
        "ttft_p99": pct([r["ttft"] for r in late], 99),
        "per_worker": dict(per_worker),
        "fallbacks": c.fallbacks,
        "same_worker": sum(a["worker"] == b["worker"] for a, b in pairs) / max(1, len(pairs)),
        "invited": sum(r["invited"] for r in out) / max(1, len(out)),
    }


async def run(args: argparse.Namespace) -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    with mosquitto() as port, redis_server() as redis_url, workers(port, redis_url, cores, args.block_size):
        await arm(port, "warmup", 4, 2)  # kernels, allocator, first prefix-cache blocks: paid by no arm
        names = args.arms.split(",") * args.rounds  # alternated: neither arm always runs first
        results = [await arm(port, name, args.sessions, args.turns, args.think_s) for name in names]
    cpu = await asyncio.to_thread(Path("/proc/cpuinfo").read_text)
    print(f"machine: {len(os.sched_getaffinity(0))} cores, {'avx512_bf16' if 'avx512_bf16' in cpu else 'no bf16'}")
    print(
        f"{args.sessions} sessions x {args.turns} turns, two workers pinned to cores {cores}, think time "
        f"{args.think_s:g} s, block size {args.block_size or 'default'}; turns >= 4:"
    )
    for r in results:
        mean_share = r["requests"] / max(1, len(r["per_worker"]))
        skew = max(r["per_worker"].values()) / mean_share if r["per_worker"] else 0
        print(
            f"  {r['arm']:7} reuse cached/prompt mean {r['reuse_mean']:.2f} (min {r['reuse_min']:.2f}), "
            f"prefilled {r['prefill_mean']:.0f} tokens/request, "
            f"TTFT p50 {r['ttft_p50']:.0f} ms p99 {r['ttft_p99']:.0f} ms, {r['req_per_s']:.2f} req/s, "
            f"per worker {r['per_worker']} (max/mean {skew:.2f}), errors {r['errors']}, fallbacks {r['fallbacks']}, "
            f"next turn on the same worker {r['same_worker']:.2f}, replies inviting {r['invited']:.2f}"
        )
    if len(results) == 2:
        s, h = results
        print(f"  TTFT p50 shared/sticky: {h['ttft_p50'] / max(1, s['ttft_p50']):.2f}x")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--arms", default="sticky,shared")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--think-s", type=float, default=0.0, help="mean think time before each turn (exponential)")
    p.add_argument("--block-size", type=int, default=None, help="the engines' KV-cache block size")
    asyncio.run(run(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
