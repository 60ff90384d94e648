"""Side-by-side benchmark, one run, one process tree, same model and prompts:

  (a) direct   the bare in-process AsyncLLM, no MQTT (benchmarks/direct_engine.py)
  (b) amqtt    vllm-worker over its embedded broker
  (c) mosquitto vllm-worker over Mosquitto
  (d) legacy   the old script's design: one synchronous LLM.generate per request, one at a time,
               from a thread pool, over MQTT (benchmarks/legacy_worker.py)
  (e) serve    vLLM's own OpenAI server, streaming chat completions (benchmarks/serve_arm.py): what a
               user would run instead of the worker
  serve-mp0    arm (e) in the worker's layout (VLLM_ENABLE_V1_MULTIPROCESSING=0): the API server at its
               best on 2 cores (issue 30)
  mosquitto-mp1  arm (c) with vLLM's default engine layout (VLLM_ENABLE_V1_MULTIPROCESSING=1: the model
               in a worker process of its own beside the engine core, one core reserved for the front-end)

    .venv/bin/python benchmarks/bench.py [--levels 1,8,32] [--max-tokens 64] [--history] [--micro]
    .venv/bin/vllm-worker bench ...       (the same)

Every arm generates exactly --max-tokens tokens per request (ignore_eos), greedy, on the prompts of
benchmarks/data/prompts.json (--history prepends a 4-turn chat). Reports per arm and level: output
tok/s, requests/s, TTFT/TPOT/end-to-end p50 and p99, worker RSS, CPU-seconds per 1,000 generated tokens
per process group (engine, front-end, broker, client: benchmarks/cpu.py), and the ratios (b)/(a),
(c)/(a), (b)/(d), (c)/(e). Each level runs 4 x concurrency requests (at least 8), after a warm-up.
Writes benchmarks/results/latest.{json,md,png}. --micro adds the MQTT path alone with the fake engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.progress import Progress, TaskID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pyspy
import runs
from cpu import delta, front_and_engine, group_cpu_s
from serve_arm import run_serve_level, serve_command, serve_env

from worker import log as worker_log
from worker.client import Client
from worker.config import BrokerConfig, LogConfig
from worker.engine import plan as planner
from worker.transport.bus import Bus

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "models" / "smollm2-135m-instruct"  # --model replaces it (e.g. a real model on a GPU host)
PROJECT = "general"
BROKER_PIDS: dict[int, int] = {}
ARM_ENV = {  # worker arms that differ from (c) by settings only
    "mosquitto-mp1": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
}
PROFILES: Path | None = None  # --profile DIR: py-spy on each server's front-end during every level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


@dataclass
class LevelResult:
    arm: str
    concurrency: int
    requests: int
    wall_s: float
    samples: list[dict[str, float]]
    rss_mib: float = 0.0
    errors: int = 0
    cpu_s: dict[str, float] | None = None
    """CPU-seconds per process group during the level (benchmarks/cpu.py)."""

    def summary(self) -> dict[str, float]:
        ok = [s for s in self.samples if s.get("tokens", 0) > 0]
        tokens = sum(s["tokens"] for s in ok)
        ttft = [s["ttft_s"] * 1000 for s in ok]
        e2e = [s["e2e_s"] * 1000 for s in ok]
        tpot = [(s["e2e_s"] - s["ttft_s"]) * 1000 / max(1, s["tokens"] - 1) for s in ok]
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "tok_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "req_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "ttft_ms_p50": pct(ttft, 50),
            "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50),
            "tpot_ms_p99": pct(tpot, 99),
            "e2e_ms_p50": pct(e2e, 50),
            "e2e_ms_p99": pct(e2e, 99),
            "rss_mib": self.rss_mib,
            "cpu_s_per_ktok": {k: round(v * 1000 / tokens, 3) for k, v in (self.cpu_s or {}).items()} if tokens else {},
        }


def tree_rss_mib(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


@contextlib.contextmanager
def mosquitto() -> Iterator[int]:  # the broker's pid goes to BROKER_PIDS[port] (CPU accounting)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-mosq-"))
    conf = tmp / "m.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    BROKER_PIDS[port] = proc.pid
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def process(cmd: list[str], ready_marker: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Start a server process and wait for its ready line (stderr or stdout)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if ready_marker in line:
                break
        else:
            raise RuntimeError(f"{cmd[2:4]} exited before ready:\n{''.join(lines[-30:])}")
        # keep draining output so the child never blocks on a full pipe
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def chats(history: bool) -> list[list[dict[str, str]]]:
    data = json.loads((ROOT / "benchmarks" / "data" / "prompts.json").read_text())
    prefix = data["history"] if history else []
    return [[*prefix, {"role": "user", "content": p}] for p in data["prompts"]]


def levels(spec: str, legacy: bool = False) -> list[dict[str, int]]:
    out = []
    for c in (int(x) for x in spec.split(",")):
        n = max(8, 4 * c)  # steady state: the ratio does not hang on one ramp
        if legacy:
            n = min(n, max(8, c))  # one at a time: keep the serial arm's run time bounded
        out.append({"concurrency": c, "requests": n})
    return out


async def run_worker_level(
    port: int, level: dict[str, int], convo: list[list[dict[str, str]]], max_tokens: int, arm: str
) -> LevelResult:
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}", protocol="auto")) as client:
        await client.ask(PROJECT, "warm up", maxTokens=4)  # every arm gets one untimed request first
        sem = asyncio.Semaphore(level["concurrency"])
        samples: list[dict[str, float]] = []
        errors = 0

        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                started = time.perf_counter()
                first = None
                chat = convo[i % len(convo)]
                history = {"messages": chat} if len(chat) > 1 else {}
                async for chunk in client.stream(
                    PROJECT, chat[-1]["content"], session=f"b{i}", maxTokens=max_tokens, temperature=0, **history
                ):
                    if first is None and chunk.delta:
                        first = time.perf_counter()
                    if chunk.done:
                        end = time.perf_counter()
                        assert chunk.reply is not None
                        if not chunk.reply.ok:
                            errors += 1
                            return
                        tokens = chunk.reply.raw["usage"]["completionTokens"]
                        samples.append({"ttft_s": (first or end) - started, "e2e_s": end - started, "tokens": tokens})

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(level["requests"])))
        return LevelResult(
            arm, level["concurrency"], level["requests"], time.perf_counter() - started, samples, errors=errors
        )


async def run_legacy_level(
    port: int, level: dict[str, int], convo: list[list[dict[str, str]]], max_tokens: int
) -> LevelResult:
    async with Bus(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), "bench-legacy-client", protocol="3.1.1") as bus:
        await bus.subscribe([f"{PROJECT}/assistant_response/+"])
        await asyncio.sleep(0.1)
        waiting: dict[str, asyncio.Future[float]] = {}

        async def reader() -> None:
            while True:
                msg = await bus.messages()
                bus.ack(msg)
                fut = waiting.pop(msg.topic.rsplit("/", 1)[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

        task = asyncio.create_task(reader())
        warm: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiting["warmup"] = warm
        await bus.publish(
            f"{PROJECT}/user_input", json.dumps({"message": "warm up", "sessionId": "warmup", "maxTokens": 4}).encode()
        )
        await asyncio.wait_for(warm, 120)
        sem = asyncio.Semaphore(level["concurrency"])
        samples: list[dict[str, float]] = []

        async def one(i: int) -> None:
            async with sem:
                session = f"l{level['concurrency']}-{i}"
                chat = convo[i % len(convo)]
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                waiting[session] = fut
                body = {
                    "message": chat[-1]["content"],
                    "history": chat[:-1],
                    "sessionId": session,
                    "maxTokens": max_tokens,
                }
                started = time.perf_counter()
                await bus.publish(f"{PROJECT}/user_input", json.dumps(body).encode())
                end = await asyncio.wait_for(fut, 900)
                # no streaming in the old design: the first token reaches the client with the last one
                samples.append({"ttft_s": end - started, "e2e_s": end - started, "tokens": max_tokens})

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(level["requests"])))
        wall = time.perf_counter() - started
        task.cancel()
        return LevelResult("legacy", level["concurrency"], level["requests"], wall, samples)


def kv_space_gib() -> int:
    """The worker's VLLM_CPU_KVCACHE_SPACE for the bench settings, given to every arm."""
    config = json.loads((MODEL / "config.json").read_text())
    ram = psutil.virtual_memory().total / 2**30
    return planner.cpu_kv_space_gib(config, max_model_len=2048, max_num_seqs=64, kv_dtype="auto", ram_gib=ram)


def worker_env(telemetry_s: float = 5.0) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib()),
        "VLLM_WORKER_GENERATION__IGNORE_EOS": "true",
        "VLLM_WORKER_WORKER__MAX_INFLIGHT": "1024",
        "VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": str(telemetry_s),
        "VLLM_WORKER_LOG__LEVEL": "warning",
    }


async def arm_worker(
    name: str,
    broker_port: int | None,
    spec: str,
    convo: list[list[dict[str, str]]],
    max_tokens: int,
    progress: Progress,
    task: TaskID,
    telemetry_s: float = 5.0,
    env: dict[str, str] | None = None,
) -> list[LevelResult]:
    port = broker_port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--projects",
        PROJECT,
        "--worker-id",
        f"bench-{name}",
        "--max-num-seqs",
        "64",
        "--max-model-len",
        "2048",
        "--model",
        str(MODEL),
    ]
    cmd += ["--broker", f"mqtt://127.0.0.1:{port}"] if broker_port else ["--port", str(port)]
    with process(cmd, "vllm-worker: ready", {**worker_env(telemetry_s), **(env or {})}) as proc:
        broker = [BROKER_PIDS[broker_port]] if broker_port else []

        async def level_run(level: dict[str, int]) -> LevelResult:
            return await run_worker_level(port, level, convo, max_tokens, name)

        return await measured_levels(name, proc.pid, broker, spec, level_run, progress, task)


async def measured_levels(
    arm: str,
    server_pid: int,
    broker_pids: list[int],
    spec: str,
    run_level: Callable[[dict[str, int]], Awaitable[LevelResult]],
    progress: Progress,
    task: TaskID,
) -> list[LevelResult]:
    """Every level against one running server, with its CPU per process group and RSS."""
    groups = {**front_and_engine(server_pid), "client": ([os.getpid()], False)}
    if broker_pids:
        groups["broker"] = (broker_pids, False)
    results = []
    for level in levels(spec):
        before = group_cpu_s(groups)
        with profiled(arm, server_pid, level["concurrency"]):
            result = await run_level(level)
        result.cpu_s = delta(before, group_cpu_s(groups))
        result.rss_mib = tree_rss_mib(server_pid)
        results.append(result)
        progress.advance(task)
    return results


@contextlib.contextmanager
def profiled(arm: str, pid: int, concurrency: int) -> Iterator[None]:
    """With --profile: py-spy records `pid` (the front-end process) for the level, then a summary."""
    if PROFILES is None:
        yield
        return
    out = PROFILES / f"{arm}-c{concurrency}.txt"
    with pyspy.recording(pid, out):
        yield
    if out.is_file():
        summary = pyspy.markdown(f"{arm} c{concurrency}", pyspy.summarize(out))
        out.with_suffix(".md").write_text(summary)


async def arm_serve(
    arm: str, spec: str, convo: list[list[dict[str, str]]], max_tokens: int, progress: Progress, task: TaskID
) -> list[LevelResult]:
    port = free_port()

    async def level_run(level: dict[str, int]) -> LevelResult:
        wall, samples, errors = await run_serve_level(port, level, convo, max_tokens)
        return LevelResult(arm, level["concurrency"], level["requests"], wall, samples, errors=errors)

    env = serve_env(kv_space_gib(), model_in_engine_core=arm == "serve-mp0")
    with process(serve_command(str(MODEL), port), "Application startup complete", env) as proc:
        return await measured_levels(arm, proc.pid, [], spec, level_run, progress, task)


async def arm_direct(
    spec: str, convo: list[list[dict[str, str]]], max_tokens: int, progress: Progress, task: TaskID
) -> list[LevelResult]:
    payload = json.dumps({"model": str(MODEL), "levels": levels(spec), "chats": convo, "max_tokens": max_tokens})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "benchmarks" / "direct_engine.py"),
        payload,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib())},  # the same KV cache as every arm
    )
    assert proc.stdout is not None
    results = []
    async for raw in proc.stdout:
        if not raw.startswith(b"{"):
            continue  # vLLM logs to stdout too
        line = json.loads(raw)
        if "level" in line:
            lv = line["level"]
            results.append(
                LevelResult(
                    "direct",
                    lv["concurrency"],
                    lv["requests"],
                    line["wall_s"],
                    line["samples"],
                    rss_mib=tree_rss_mib(proc.pid),
                    cpu_s=line.get("cpu_s"),
                )
            )
            progress.advance(task)
    await proc.wait()
    return results


async def arm_legacy(
    port: int, spec: str, convo: list[list[dict[str, str]]], max_tokens: int, progress: Progress, task: TaskID
) -> list[LevelResult]:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "legacy_worker.py"),
        "--port",
        str(port),
        "--model",
        str(MODEL),
        "--project",
        PROJECT,
        "--ignore-eos",
    ]
    results = []
    with process(cmd, "READY") as proc:
        for level in levels(spec, legacy=True):
            result = await run_legacy_level(port, level, convo, max_tokens)
            result.rss_mib = tree_rss_mib(proc.pid)
            results.append(result)
            progress.advance(task)
    return results


# ---- micro-benchmark: the MQTT path alone (fake engine, zero latency) ------------------------------------
async def micro(requests: int, concurrency: int, flood: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {"VLLM_WORKER_WORKER__MAX_INFLIGHT": "100000", "VLLM_WORKER_LOG__LEVEL": "warning"}
    for broker in ("amqtt", "mosquitto"):
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(mosquitto()) if broker == "mosquitto" else free_port()
            cmd = [sys.executable, "-m", "worker", "--engine", "fake", "--projects", PROJECT, "--worker-id", "micro"]
            cmd += ["--broker", f"mqtt://127.0.0.1:{port}"] if broker == "mosquitto" else ["--port", str(port)]
            stack.enter_context(process(cmd, "vllm-worker: ready", env))
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as client:
                sem = asyncio.Semaphore(concurrency)

                async def one(i: int) -> bool:
                    async with sem:
                        return (await client.ask(PROJECT, f"hello {i}", session=f"m{i % 64}")).ok

                started = time.perf_counter()
                oks = await asyncio.gather(*(one(i) for i in range(requests)))
                req_s = requests / (time.perf_counter() - started)
            rejects_s = await flood_invalid(port, flood)
            out[broker] = {"requests_per_s": round(req_s, 1), "ok": sum(oks), "rejects_per_s": round(rejects_s, 1)}
    return out


async def flood_invalid(port: int, count: int) -> float:
    """Publish `count` malformed payloads; time until every `Error: ...` reply is back."""
    async with Bus(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), "micro-flood", protocol="3.1.1") as bus:
        topic = f"{PROJECT}/assistant_response/flood"
        await bus.subscribe([topic])
        await asyncio.sleep(0.1)
        got = 0
        done = asyncio.Event()

        async def reader() -> None:
            nonlocal got
            while True:
                msg = await bus.messages()
                bus.ack(msg)
                if msg.payload.startswith(b"Error:"):
                    got += 1
                    if got >= count:
                        done.set()

        task = asyncio.create_task(reader())
        started = time.perf_counter()
        for _ in range(count):
            await bus.publish(f"{PROJECT}/user_input/flood", b'{"message": "unterminated', wait=False)
        await asyncio.wait_for(done.wait(), 120)
        task.cancel()
        return count / (time.perf_counter() - started)


# ---- report ----------------------------------------------------------------------------------------------
def report(results: dict[str, list[LevelResult]], args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    table = {arm: [r.summary() for r in rows] for arm, rows in results.items()}

    def tok(arm: str, c: int) -> float:
        return float(row["tok_per_s"]) if (row := runs.level_row(table, arm, c)) else 0.0

    def ttft(arm: str, c: int) -> float:
        return float(row["ttft_ms_p50"]) if (row := runs.level_row(table, arm, c)) else 0.0

    conc = [int(c) for c in args.levels.split(",")]

    def ratio(a: str, b: str, c: int) -> float | None:  # None where either arm did not run
        return tok(a, c) / tok(b, c) if tok(a, c) and tok(b, c) else None

    def overhead(a: str, c: int) -> float | None:
        return ttft(a, c) - ttft("direct", c) if tok(a, c) and tok("direct", c) else None

    ratios = {
        c: {
            "amqtt/direct": ratio("amqtt", "direct", c),
            "mosquitto/direct": ratio("mosquitto", "direct", c),
            "amqtt/legacy": ratio("amqtt", "legacy", c),
            "mosquitto/serve": ratio("mosquitto", "serve", c),
            "mosquitto-mp1/serve": ratio("mosquitto-mp1", "serve", c),
            "mosquitto/serve-mp0": ratio("mosquitto", "serve-mp0", c),
            "ttft_overhead_ms_amqtt": overhead("amqtt", c),
            "ttft_overhead_ms_mosquitto": overhead("mosquitto", c),
        }
        for c in conc
    }
    batching_gain = tok("direct", max(conc)) / tok("direct", min(conc)) if tok("direct", min(conc)) else None
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{'GPU' if Path('/dev/nvidiactl').exists() else 'no GPU'}",
        "model": MODEL.name,
        "max_tokens": args.max_tokens,
        "variant": "history" if args.history else "fixed",
        "arms": table,
        "ratios": ratios,
        "engine_batching_gain": batching_gain,
        **extra,
    }


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        (
            f"Benchmark {rep['when']} on {rep['machine']}; model {rep['model']}, {rep['max_tokens']} "
            f"tokens/request (ignore_eos), variant {rep['variant']}."
        ),
        "",
        "| arm | conc | tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | e2e p50/p99 ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in rep["arms"].items():
        for r in rows:
            lines.append(
                f"| {arm} | {r['concurrency']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                f"{r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.1f}/{r['tpot_ms_p99']:.1f} | "
                f"{r['e2e_ms_p50']:.0f}/{r['e2e_ms_p99']:.0f} | {r['rss_mib']:.0f} |"
            )
    lines += [
        "",
        "| conc | (b) amqtt/(a) direct | (c) mosquitto/(a) | (b)/(d) legacy | TTFT overhead (b), (c) ms |",
        "|---|---|---|---|---|",
    ]
    for c, r in rep["ratios"].items():

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        lines.append(
            f"| {c} | {f(r['amqtt/direct'])} | {f(r['mosquitto/direct'])} | {f(r['amqtt/legacy'])} | "
            f"{_ms(r['ttft_overhead_ms_amqtt'])}, {_ms(r['ttft_overhead_ms_mosquitto'])} |"
        )
    lines += _cpu_lines(rep)
    if rep.get("engine_batching_gain"):
        lines.append(
            f"\nEngine batching gain (direct tok/s at max ÷ min concurrency): {rep['engine_batching_gain']:.2f}x"
        )
    if "micro" in rep:
        lines += [
            "",
            "MQTT path alone (fake engine): | broker | requests/s | rejects/s (malformed flood) |",
            "|---|---|---|",
        ]
        for broker, m in rep["micro"].items():
            lines.append(f"| {broker} | {m['requests_per_s']} | {m['rejects_per_s']} |")
    return "\n".join(lines) + "\n"


def _cpu_lines(rep: dict[str, Any]) -> list[str]:
    """CPU per 1,000 tokens per arm and level, and the worker/serve ratios."""
    lines = ["", "CPU-seconds per 1,000 generated tokens (benchmarks/cpu.py):", "", "| arm | conc | groups |"]
    lines.append("|---|---|---|")
    for arm, rows in rep["arms"].items():
        for r in rows:
            groups = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("cpu_s_per_ktok", {}).items()))
            lines.append(f"| {arm} | {r['concurrency']} | {groups or '-'} |")
    arms = ["mosquitto/serve", "mosquitto-mp1/serve", "mosquitto/serve-mp0"]
    serve = [(c, [r.get(a) for a in arms]) for c, r in rep["ratios"].items()]
    if any(x is not None for _, xs in serve for x in xs):
        header = "| conc | " + " | ".join(f"{a} tok/s" for a in arms) + " |"
        lines += ["", header, "|---" * (1 + len(arms)) + "|"]
        lines += [f"| {c} | " + " | ".join(_ratio(x) for x in xs) + " |" for c, xs in serve]
    return lines


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, rows in rep["arms"].items():
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["tok_per_s"] for r in rows], marker="o", label=arm)
        ax2.plot(xs, [r["ttft_ms_p50"] for r in rows], marker="o", label=arm)
    ax1.set(xlabel="concurrency", ylabel="output tok/s", title="Throughput", xscale="log")
    ax2.set(xlabel="concurrency", ylabel="TTFT p50 (ms)", title="Time to first token", xscale="log", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"vllm-worker, {rep['model']}, {rep['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run_arm(
    arm: str, args: argparse.Namespace, convo: list[list[dict[str, str]]], progress: Progress, task: TaskID
) -> list[LevelResult]:
    """One arm at every level."""
    spec, tokens = args.levels, args.max_tokens
    if arm == "direct":
        return await arm_direct(spec, convo, tokens, progress, task)
    if arm == "amqtt":
        return await arm_worker(arm, None, spec, convo, tokens, progress, task)
    if arm == "telemetry1s":
        return await arm_worker(arm, None, spec, convo, tokens, progress, task, 1.0)
    if arm in {"serve", "serve-mp0"}:
        return await arm_serve(arm, spec, convo, tokens, progress, task)
    with mosquitto() as port:
        if arm == "legacy":
            return await arm_legacy(port, spec, convo, tokens, progress, task)
        env = ARM_ENV.get(arm)
        return await arm_worker(arm, port, spec, convo, tokens, progress, task, env=env)


async def main_async(args: argparse.Namespace) -> int:
    if not (MODEL / "config.json").is_file():
        print("demo model missing: run `make model`", file=sys.stderr)
        return 2
    convo = chats(args.history)
    arms = [a for a in args.arms.split(",") if a]
    n_levels = len(args.levels.split(","))
    extra: dict[str, Any] = {}
    reps: list[dict[str, Any]] = []
    with Progress() as progress:
        total = args.runs * n_levels * len(arms) + (1 if args.micro else 0)
        task = progress.add_task("benchmark", total=total)
        for run in range(1, args.runs + 1):
            results: dict[str, list[LevelResult]] = {}
            for arm in arms:  # one engine at a time: the 2-core machine is never shared between arms
                progress.update(task, description=f"run {run}/{args.runs}: arm {arm}")
                results[arm] = await run_arm(arm, args, convo, progress, task)
            reps.append(report(results, args, {}))
        if args.micro:
            progress.update(task, description="micro (fake engine)")
            extra["micro"] = await micro(args.micro_requests, 64, args.micro_flood)
            progress.advance(task)
    rep = {**reps[-1], **extra}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(rep, indent=2))
    (RESULTS / "latest-runs.json").write_text(json.dumps(reps, indent=2))
    md = markdown(rep) + "\n" + runs.markdown(reps)
    (RESULTS / "latest.md").write_text(md)
    try:
        plot(rep, RESULTS / "latest.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
    print(md)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--model", default=None, help="HF model dir (default: the demo model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--history", action="store_true", help="realistic variant: a 4-turn chat before each prompt")
    extra_arms = "also: serve, serve-mp0, mosquitto-mp1, telemetry1s"
    p.add_argument("--arms", default="direct,amqtt,mosquitto,legacy", help=extra_arms)
    p.add_argument("--runs", type=int, default=1, help="repeat every arm N times; targets reported as min-max")
    p.add_argument("--micro", action="store_true", help="also the MQTT path alone with the fake engine")
    p.add_argument("--micro-requests", type=int, default=2000)
    p.add_argument("--micro-flood", type=int, default=2000)
    p.add_argument("--profile", type=Path, default=None, help="py-spy each server during every level into DIR")
    args = p.parse_args()
    if args.profile:
        if pyspy.available() is None:
            print("--profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return 2
        global PROFILES  # noqa: PLW0603 - one run, one profile folder
        PROFILES = args.profile.resolve()
        PROFILES.mkdir(parents=True, exist_ok=True)
    if args.model:
        global MODEL  # noqa: PLW0603 - one run, one model for every arm
        MODEL = Path(args.model).resolve()
    worker_log.setup(LogConfig(level="warning"))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
