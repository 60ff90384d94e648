"""What a device-tool round costs: latency overhead per request, and throughput at concurrency 32.

    .venv/bin/python benchmarks/tool_rounds.py [--n 300] [--total 1280]

A worker (Service, fake engine answering at once) and a simulated device (a plain MQTT 5 client that
answers every call immediately) on a throw-away Mosquitto. Arm "plain": a v2 request without tools.
Arm "tool": the same request whose model calls one device tool (one round: call out, result in,
generate again). Both arms run side by side in one run: latency sequentially (p50/p99 of `--n` each,
interleaved), throughput with 32 requests in flight (`--total` each). What the round adds is the
difference; the engine's own time is excluded by the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import mosquitto, pct

from worker import log
from worker.client import Client
from worker.config import BrokerConfig, WorkerConfig
from worker.engine.fake import FakeEngine
from worker.projects import load_projects
from worker.service import Service
from worker.transport.bus import Bus

LAB = """
name = "lab"
system_prompt = "You drive a lab robot."
[[tools]]
name = "ping"
description = "Ping the device."
topic = "lab/tools/dev/ping"
timeout_s = 10.0
"""
TOOL, PLAIN = "call:ping", "hello"


async def device(port: int, stop: asyncio.Event) -> None:
    """Answers every call at once, on the call's reply topic."""
    async with Bus(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), "bench-device", protocol="5") as bus:
        await bus.subscribe(["lab/tools/#"])
        while not stop.is_set():
            msg = await bus.messages()
            bus.ack(msg)
            call = json.loads(msg.payload)
            body = json.dumps({"callId": call["callId"], "content": "pong"}).encode()
            await bus.publish(call["replyTopic"], body, wait=False)


async def latency(c: Client, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"plain": [], "tool": []}
    for i in range(n):
        for arm, text in (("plain", PLAIN), ("tool", TOOL)):
            started = time.perf_counter()
            reply = await c.ask("lab", text, session=f"{arm}-{i % 8}", request_id=f"lat-{arm}-{i}")
            assert reply.ok, reply.raw
            assert arm == "plain" or reply.raw.get("trace"), reply.raw
            out[arm].append((time.perf_counter() - started) * 1000)
    return out


async def throughput(c: Client, text: str, total: int, tag: str) -> float:
    queue = list(range(total))

    async def lane(k: int) -> None:
        while queue:
            i = queue.pop()
            reply = await c.ask("lab", text, session=f"{tag}-{k}", request_id=f"{tag}-{i}", timeout_s=60)
            assert reply.ok, reply.raw

    started = time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(32)))
    return total / (time.perf_counter() - started)


async def run(n: int, total: int) -> None:
    topics = Path(tempfile.mkdtemp(prefix="bench-topics-"))
    (topics / "lab.toml").write_text(LAB)
    with mosquitto() as port:
        data = {
            "broker": {"url": f"mqtt://127.0.0.1:{port}"},
            "worker": {"projects": ["lab"], "topics_dir": str(topics), "id": "bench", "max_inflight": 1024},
            "log": {"level": "warning"},
        }
        cfg = WorkerConfig.model_validate(data)
        log.setup(cfg.log)
        service = Service(cfg, load_projects(str(topics), ["lab"]), FakeEngine())
        stop = asyncio.Event()
        worker = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.ready.wait(), 15)
        dev = asyncio.create_task(device(port, stop))
        try:
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id="bench-app") as c:
                await latency(c, 20)  # warm-up
                lat = await latency(c, n)
                rates = {}
                for arm, text in (("plain", PLAIN), ("tool", TOOL), ("plain2", PLAIN), ("tool2", TOOL)):
                    rates[arm] = await throughput(c, text, total, arm)
        finally:
            stop.set()
            dev.cancel()
            await worker
    shutil.rmtree(topics, ignore_errors=True)
    cpu = await asyncio.to_thread(Path("/proc/cpuinfo").read_text)
    flags = "avx512_bf16" if "avx512_bf16" in cpu else ("avx512f" if "avx512f" in cpu else "no avx512")
    print(f"machine: {len([x for x in cpu.splitlines() if x.startswith('processor')])} cores, {flags}")
    for arm in ("plain", "tool"):
        v = lat[arm]
        mean = statistics.mean(v)
        print(f"latency {arm:5}: p50 {pct(v, 50):.2f} ms  p99 {pct(v, 99):.2f} ms  mean {mean:.2f} ms (n={n})")
    print(
        f"tool round overhead: p50 +{pct(lat['tool'], 50) - pct(lat['plain'], 50):.2f} ms, "
        f"p99 +{pct(lat['tool'], 99) - pct(lat['plain'], 99):.2f} ms"
    )
    print(
        f"c32 throughput: plain {rates['plain']:.0f} / {rates['plain2']:.0f} req/s, "
        f"one tool round {rates['tool']:.0f} / {rates['tool2']:.0f} req/s (two passes each, {total} requests)"
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--total", type=int, default=1280)
    args = p.parse_args()
    asyncio.run(run(args.n, args.total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
