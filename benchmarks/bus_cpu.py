"""CPU the bus spends per published message (issue 16): the stream-chunk path alone, without an engine.

    .venv/bin/python benchmarks/bus_cpu.py [--streams 32] [--chunks 200] [--bytes 300] [--rounds 3] [--loop auto]

`--streams` tasks each publish one QoS1 chunk with MQTT v5 correlation data per round, all woken in the
same loop turn like the worker's requests after an engine step, for `--chunks` rounds, to Mosquitto
(with one subscriber in this process too, so the broker delivers and PUBACKs with success). Prints
this process's CPU (user + system, all threads: publisher and subscriber) per message and the number
of the publisher's and subscriber's socket writes. Run it from a checkout of
another commit to compare designs side by side (e.g. a `git worktree` of the commit before pahoio).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import mosquitto

from worker.config import BrokerConfig
from worker.transport.bus import Bus

try:
    from worker.transport import eventloop, pahoio
except ImportError:  # a commit before pahoio: paho's network thread, asyncio only
    eventloop = pahoio = None  # type: ignore[assignment]

WRITES = [0]


def _count_writes() -> None:
    if pahoio is None:
        return
    write_held = pahoio.Buffered.write_held

    def counted(self: pahoio.Buffered) -> bool:
        if self.held:
            WRITES[0] += 1
        return write_held(self)

    pahoio.Buffered.write_held = counted  # type: ignore[method-assign]


async def one_round_set(port: int, args: argparse.Namespace, progress: Progress) -> float:
    """CPU-seconds for streams x chunks publishes (each awaited until paho queued it; finals not needed)."""
    cfg = BrokerConfig(url=f"mqtt://127.0.0.1:{port}")
    async with Bus(cfg, "bus-cpu-sub") as sub, Bus(cfg, "bus-cpu-pub") as pub:
        await sub.subscribe(["bench/#"])
        received = 0
        total = args.streams * args.chunks

        async def drain() -> None:
            nonlocal received
            while received < total:
                sub.ack(await sub.messages())
                received += 1

        go = asyncio.Event()
        payload = b"x" * args.bytes

        async def stream(i: int) -> None:
            corr = f"req-{i}".encode()
            for _ in range(args.chunks):
                await go.wait()
                await pub.publish(f"bench/{i}", payload, correlation_data=corr, wait=False)
                await asyncio.sleep(0)

        task = progress.add_task("publishing", total=args.chunks)
        reader = asyncio.ensure_future(drain())  # supervised: awaited below
        streams = [asyncio.ensure_future(stream(i)) for i in range(args.streams)]  # supervised: gathered
        start = time.process_time()
        for _ in range(args.chunks):
            go.set()
            await asyncio.sleep(0)
            go.clear()
            await asyncio.sleep(0.002)  # an engine step apart
            progress.advance(task)
        await asyncio.gather(*streams)
        await pub.publish("bench/done", b"", wait=True)  # every earlier one is acked before this one
        spent = time.process_time() - start
        await asyncio.wait_for(reader, 30)
        progress.remove_task(task)
        return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--bytes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="as worker.event_loop")
    args = ap.parse_args()
    _count_writes()
    n = args.streams * args.chunks
    with mosquitto() as port, Progress() as progress:
        for r in range(args.rounds):
            WRITES[0] = 0
            main = one_round_set(port, args, progress)
            spent = eventloop.run(main, args.loop) if eventloop is not None else asyncio.run(main)
            writes = WRITES[0] if pahoio is not None else "n/a (paho's thread)"
            progress.console.print(
                f"round {r + 1}: {spent * 1e6 / n:.1f} us CPU per message ({n} messages, {spent:.3f} s), "
                f"socket writes: {writes}"
            )


if __name__ == "__main__":
    main()
