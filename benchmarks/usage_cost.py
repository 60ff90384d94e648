"""What usage accounting and quotas cost per request (issue 31): this tree against a git ref without them.

    .venv/bin/python benchmarks/usage_cost.py --base 976aa9e [--requests 2000] [--levels 1,32] [--rounds 2]

One fake-engine worker (no token delay: the MQTT + state path is all there is) on Mosquitto, per code tree
(`--base` checked out into a temporary worktree, and this tree), per state backend (memory, a local
redis-server) and concurrency level, alternated `--rounds` times. Every request is a stateful v2 turn with
a client-supplied requestId (claim, buckets, session lock, history, cached reply: the full state path), and
in this tree it is also checked against a daily quota and counted. Prints end-to-end p50/p99 (publish ->
final reply) per arm and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import mosquitto, pct
from state_latency import redis_server, timed_turns

PROJECT = "general"
QUOTA = "\n[quota]\nclient_tokens_per_day = 1000000000000\nproject_tokens_per_day = 1000000000000\n"


def topics_dir(tree: Path) -> Path:
    """`general` with a rate limit and a quota that are never reached: every request checks both."""
    tmp = Path(tempfile.mkdtemp(prefix="usage-topics-"))
    text = (tree / "topics" / f"{PROJECT}.toml").read_text()
    text += "\n[rate_limit]\nrequests_per_s = 1000000.0\nburst = 1000000\n"
    text += "project_requests_per_s = 1000000.0\nproject_burst = 1000000\n"
    (tmp / f"{PROJECT}.toml").write_text(text + (QUOTA if tree == ROOT else ""))
    return tmp


@contextlib.contextmanager
def worker(tree: Path, env: dict[str, str], tag: str, port: int) -> Iterator[None]:
    """A worker running the code of `tree` (its own directory first on sys.path)."""
    cmd = [sys.executable, "-m", "worker", "--engine", "fake", "--projects", PROJECT, "--worker-id", f"cost-{tag}"]
    cmd += ["--broker", f"mqtt://127.0.0.1:{port}"]
    full = {**os.environ, **env, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, cwd=tree, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "vllm-worker: ready" in line:
                break
        else:
            raise RuntimeError(f"worker of {tree} exited before ready")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield
    finally:
        proc.terminate()
        proc.wait(30)


Results = dict[tuple[str, str, int], list[float]]


async def measure(args: argparse.Namespace, trees: dict[str, Path]) -> Results:
    levels = [int(x) for x in args.levels.split(",")]
    results: Results = {}
    with mosquitto() as port, redis_server() as redis_url, Progress() as progress:
        task = progress.add_task("usage cost", total=args.rounds * 4 * len(levels))
        for r in range(args.rounds):
            for backend, url in (("memory", "memory"), ("redis", redis_url)):
                for name, tree in trees.items() if r % 2 == 0 else reversed(trees.items()):  # alternated
                    env = {
                        "VLLM_WORKER_STATE__URL": url,
                        "VLLM_WORKER_WORKER__TOPICS_DIR": str(topics_dir(tree)),
                        "VLLM_WORKER_WORKER__MAX_INFLIGHT": "100000",
                        "VLLM_WORKER_LOG__LEVEL": "warning",
                    }
                    with worker(tree, env, f"{name}{backend}{r}", port):
                        for c in levels:
                            progress.update(task, description=f"round {r + 1}: {name} on {backend}, c{c}")
                            tag = f"{name}{backend}{r}c{c}"
                            results.setdefault((backend, name, c), []).extend(
                                await timed_turns(port, args.requests, c, tag)
                            )
                            progress.advance(task)
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="a git ref without usage accounting, e.g. 976aa9e")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--levels", default="1,32")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="usage-base-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "-q", str(base), args.base], check=True)
    try:
        results = asyncio.run(measure(args, {"base": base, "usage": ROOT}))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    cpu = Path("/proc/cpuinfo").read_text()
    print(f"{os.cpu_count()} cores ({'avx512_bf16' if 'avx512_bf16' in cpu else 'no bf16'}), fake engine, Mosquitto;")
    print(f"{args.requests} requests x {args.rounds} rounds per arm; base = {args.base}")
    print(f"{'backend':8} {'conc':>4} {'base p50/p99 ms':>16} {'usage p50/p99 ms':>17} {'added p50/p99 ms':>17}")
    for backend in ("memory", "redis"):
        for c in (int(x) for x in args.levels.split(",")):
            b, u = results[(backend, "base", c)], results[(backend, "usage", c)]
            bp, up = (pct(b, 50), pct(b, 99)), (pct(u, 50), pct(u, 99))
            print(
                f"{backend:8} {c:4} {bp[0]:7.2f}/{bp[1]:7.2f} {up[0]:8.2f}/{up[1]:7.2f} "
                f"{up[0] - bp[0]:+8.2f}/{up[1] - bp[1]:+7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
