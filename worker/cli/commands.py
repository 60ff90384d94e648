"""The client-side subcommands `ask`, `fleet`, `usage`, `plan` and `bench` (dispatched by `cli.main`).

Also what every client tool shares: `run_tool`, `broker_from_env`, `cli_identity`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import math
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.cli.terminal import EXIT_CONFIG, say
from worker.config import ROOT, BrokerConfig
from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.client import Reply

RESEND_S = 10.0
"""`ask` sends its request again this often while no final reply came (a worker that restarted lost it)."""


def _ask_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-worker ask", description="Ask a project a question over MQTT.")
    p.add_argument("project")
    p.add_argument("message")
    p.add_argument("--session", default="default")
    p.add_argument("--broker", default=os.environ.get("VLLM_WORKER_BROKER__URL", "mqtt://127.0.0.1:1883"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument(
        "--tools",
        metavar="FILE",
        help="JSON file: a list of OpenAI-shaped tools to offer; the calls the model makes are printed as JSON",
    )
    p.add_argument("--tool-choice", default=None, help="auto | none | required | the name of one tool")
    p.add_argument(
        "--client-id",
        default=None,
        help="v2 clientId: sessions live in its namespace (default: the broker username, else cli-<user>)",
    )
    return p


def ask(argv: Sequence[str]) -> int:
    """Publish one request and print the answer."""
    p = _ask_parser()
    args = p.parse_args(argv)
    from worker import log  # noqa: PLC0415
    from worker.client import Client  # noqa: PLC0415
    from worker.config import LogConfig  # noqa: PLC0415

    log.setup(LogConfig(level="warning"))  # stdout carries only the answer

    fields = {k: v for k, v in {"maxTokens": args.max_tokens, "temperature": args.temperature}.items() if v is not None}
    try:
        fields |= _tool_fields(args.tools, args.tool_choice)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG

    async def go() -> int:
        broker = broker_from_env(args.broker)
        username = broker.username
        # One identity across invocations, so `--session s1` twice continues one conversation (v2 sessions
        # live in their clientId's namespace); a fresh MQTT connection id each time, so two never collide.
        client_id = args.client_id or username or cli_identity()
        async with Client(broker, client_id, connection_id=f"{client_id}-{uuid.uuid4().hex[:8]}") as client:
            started = time.monotonic()
            await client.wait_for_worker(
                args.project, args.timeout, on_wait=lambda: say(f"waiting for a worker serving {args.project}...")
            )
            left_s = max(1.0, args.timeout - (time.monotonic() - started))
            if not args.stream:  # resent every RESEND_S with the same requestId (dedupe makes it safe)
                reply = await client.ask(
                    args.project,
                    args.message,
                    session=args.session,
                    timeout_s=min(left_s, RESEND_S),
                    retries=max(0, math.ceil(left_s / RESEND_S) - 1),
                    **fields,
                )
            else:
                final = None
                chunks = client.stream(
                    args.project, args.message, session=args.session, timeout_s=args.timeout, **fields
                )
                async for chunk in chunks:
                    print(chunk.delta, end="", flush=True)
                    final = chunk.reply
                assert final is not None  # noqa: S101 - a stream ends with its final chunk
                reply = final
                if reply.ok:
                    print()
                    return 0
        return _print_reply(reply)

    try:
        return asyncio.run(go())
    except TimeoutError:
        say(f"no answer within {args.timeout:.0f} s (is a worker serving {args.project!r} on {args.broker}?)")
        return 1
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG


def _print_reply(reply: Reply) -> int:
    """The answer on stdout, then one JSON line per tool call (the caller runs them: `--tools`)."""
    if not reply.ok:
        say(f"error {reply.error_code}: {reply.error_message}")
        return 1
    if reply.text or not reply.tool_calls:
        print(reply.text)
    for call in reply.tool_calls:
        print(json.dumps(call, ensure_ascii=False))
    return 0


def _tool_fields(path: str | None, choice: str | None) -> dict[str, Any]:
    """`tools` (from a JSON file) and `toolChoice` (a keyword, or a tool's name) for `ask`."""
    if path is None:
        if choice is not None:
            raise ConfigError("--tool-choice needs --tools FILE")
        return {}
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --tools {path}: {exc}") from exc
    if not isinstance(tools, list):
        raise ConfigError(f'--tools {path} must hold a JSON list of {{"type": "function", "function": ...}}')
    fields: dict[str, Any] = {"tools": tools}
    if choice is not None:
        keyword = choice in {"auto", "none", "required"}
        fields["toolChoice"] = choice if keyword else {"type": "function", "function": {"name": choice}}
    return fields


def cli_identity() -> str:
    """`cli-<login name>`, reduced to the id alphabet of PROTOCOL section 1."""
    user = re.sub(r"[^A-Za-z0-9_.:-]", "", getpass.getuser())[:60] or "user"
    return f"cli-{user}"


def fleet(argv: Sequence[str]) -> int:
    """Live table (or one JSON snapshot) of every worker seen on the broker."""
    p = argparse.ArgumentParser(prog="vllm-worker fleet", description="Watch the workers on a broker.")
    p.add_argument("--broker", default=os.environ.get("VLLM_WORKER_BROKER__URL", "mqtt://127.0.0.1:1883"))
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--once", action="store_true", help="collect for --wait seconds, print once, exit")
    p.add_argument("--json", action="store_true", help="with --once: print JSON instead of the table")
    p.add_argument("--wait", type=float, default=6.0, help="seconds to listen with --once (default 6)")
    p.add_argument("--prometheus", type=int, metavar="PORT", help="also serve /metrics on this port")
    p.add_argument("--prometheus-host", default="127.0.0.1")
    p.add_argument("--retire", metavar="WORKER_ID", help="remove a worker for good: its status and HA sensors")
    p.add_argument("--homeassistant-prefix", default="homeassistant", help="with --retire (default homeassistant)")
    args = p.parse_args(argv)
    if args.retire:
        from worker.cli.retire import retire  # noqa: PLC0415

        prefixes = {"topic_prefix": args.topic_prefix, "ha_prefix": args.homeassistant_prefix}
        return run_tool(retire(broker_from_env(args.broker), args.retire, **prefixes))
    return run_tool(_fleet(args))


async def _fleet(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from worker.fleet.view import FleetState, PrometheusCollector, render  # noqa: PLC0415
    from worker.transport.bus import Bus  # noqa: PLC0415

    state = FleetState(topic_prefix=args.topic_prefix)
    if args.prometheus:
        from prometheus_client import REGISTRY, start_http_server  # noqa: PLC0415

        REGISTRY.register(PrometheusCollector(state))
        start_http_server(args.prometheus, addr=args.prometheus_host)
        say(f"prometheus metrics on http://{args.prometheus_host}:{args.prometheus}/metrics")
    async with Bus(broker_from_env(args.broker), f"fleet-{uuid.uuid4().hex[:8]}") as bus:

        async def read() -> None:
            while True:
                msg = await bus.messages()
                bus.ack(msg)
                state.handle(msg.topic, msg.payload)

        reader = asyncio.create_task(read())  # supervised: its failure is raised below, never a frozen view
        await bus.subscribe(state.filters)
        if args.once:
            await asyncio.wait({reader}, timeout=args.wait)
            if reader.done():
                reader.result()  # it can only have ended by failing: say so
            reader.cancel()
            if args.json:
                print(json.dumps(state.snapshot(), indent=2))
            else:
                Console(width=None if sys.stdout.isatty() else 160).print(render(state))
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        with Live(render(state), refresh_per_second=2, screen=False) as live:
            while not stop.is_set() and not reader.done():
                live.update(render(state))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        if reader.done():
            reader.result()
        reader.cancel()
    return 0


def usage(argv: Sequence[str]) -> int:
    """Tokens and requests per UTC day, project and client (`worker/cli/usage.py`)."""
    from worker.cli import usage as usage_table  # noqa: PLC0415

    return run_tool(usage_table.main(argv))


def plan(argv: Sequence[str]) -> int:
    """VRAM planner: weights, KV cache and gpu_memory_utilization for models sharing one GPU."""
    p = argparse.ArgumentParser(prog="vllm-worker plan", description="Plan GPU memory for one or more models.")
    p.add_argument("models", nargs="+", help="local model dir or alias (config/models/), optionally :awq|gptq|fp8|bnb4")
    p.add_argument("--gpu-mem", default="96GiB", help="GPU memory, e.g. 96GiB or 80GB")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-dtype", default="auto", help="auto|fp8")
    p.add_argument("--min-seqs", type=int, default=4, help="full-length sequences each engine must hold")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size: split each model over this many GPUs")
    p.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size: stages (e.g. one per node)")
    p.add_argument("--max-loras", type=int, default=0, help="LoRA adapters per batch (0: no LoRA)")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from worker.engine import plan as planner  # noqa: PLC0415
    from worker.engine.parallel import Layout  # noqa: PLC0415

    try:
        specs = [planner.load_spec(m) for m in args.models]
        result = planner.plan(
            specs,
            planner.parse_size(args.gpu_mem),
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_dtype=args.kv_dtype,
            min_seqs=args.min_seqs,
            layout=Layout(args.tp, args.pp),
            lora=(args.max_loras, args.max_lora_rank) if args.max_loras else None,
        )
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    if args.json:
        print(result.to_json())
        return 0 if result.fits else 1
    gpus = f"{args.tp * args.pp} x " if args.tp * args.pp > 1 else ""
    per_gpu = f" (tp {args.tp}, pp {args.pp}: figures per GPU)" if args.tp * args.pp > 1 else ""
    title = (
        f"{gpus}{result.gpu_mem_gib:.0f} GiB GPU ({result.usable_gib:.0f} usable), "
        f"max_model_len {result.max_model_len}, KV {result.kv_dtype}{per_gpu}"
    )
    table = Table(title=title)
    for col in (
        "model",
        "method",
        "params",
        "weights",
        "KV/token",
        "KV/seq",
        "overhead",
        "gpu_memory_utilization",
        "full seqs",
    ):
        table.add_column(col)
    for m in result.models:
        table.add_row(
            m.name,
            m.method,
            f"{m.params_b:.1f}B",
            f"{m.weights_gib:.1f} GiB",
            f"{m.kv_bytes_per_token / 1024:.0f} KiB",
            f"{m.kv_gib_per_seq:.2f} GiB",
            f"{m.overhead_gib:.0f} GiB",
            f"{m.gpu_memory_utilization:.3f}",
            f"{m.max_full_seqs}/{result.max_num_seqs}",
        )
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    console.print("[green]fits[/green]" if result.fits else "[bold red]does not fit[/bold red]")
    for line in result.advice:
        console.print(f"- {line}")
    return 0 if result.fits else 1


def bench(argv: Sequence[str]) -> int:
    """Run benchmarks/bench.py (needs the source checkout: it ships prompts and the legacy arm)."""
    script = ROOT / "benchmarks" / "bench.py"
    if not script.is_file():
        say("vllm-worker bench runs from a source checkout (benchmarks/bench.py not found)")
        return EXIT_CONFIG
    import subprocess  # noqa: PLC0415

    return subprocess.call([sys.executable, str(script), *argv])  # noqa: S603 - our own script


def run_tool(main: Coroutine[Any, Any, int]) -> int:
    """Run a long-lived client tool: warnings only on the terminal, a config error is exit 2, Ctrl-C is 0."""
    from worker import log  # noqa: PLC0415
    from worker.config import LogConfig  # noqa: PLC0415

    log.setup(LogConfig(level="warning"))
    try:
        return asyncio.run(main)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


def broker_from_env(url: str) -> BrokerConfig:
    """The broker at `url` with the credentials of the environment (never flags: shell history)."""
    return BrokerConfig(
        url=url,
        username=os.environ.get("VLLM_WORKER_BROKER__USERNAME"),
        password=os.environ.get("VLLM_WORKER_BROKER__PASSWORD"),
    )
