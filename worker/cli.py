"""Command line: `vllm-worker [serve]`, `vllm-worker ask`, `vllm-worker model prepare`.

Flags of the old one-file script are accepted in both underscore and dash form.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import re
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__
from worker.config import ROOT, BrokerConfig, WorkerConfig, load, resolve_path
from worker.errors import ConfigError
from worker.models import DEMO_DIR, check_model_dir, is_prepared, prepare_demo

COMMANDS = ("serve", "ask", "model", "fleet", "plan", "bench")
EXIT_CONFIG = 2


def say(message: str) -> None:
    """A human status line (stderr, so stdout stays clean for answers and JSON)."""
    print(f"vllm-worker: {message}", file=sys.stderr, flush=True)


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:  # noqa: ANN401
    """Add `--a-b` with its `--a_b` alias (the old script used underscores)."""
    dashed = f"--{name.replace('_', '-')}"
    names = [dashed] if "_" not in name else [dashed, f"--{name}"]
    parser.add_argument(*names, dest=name, default=None, **kwargs)


def serve_parser() -> argparse.ArgumentParser:
    """Flags of `vllm-worker [serve]`."""
    p = argparse.ArgumentParser(prog="vllm-worker", description="Serve LLM answers over MQTT.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"vllm-worker {__version__}")
    _flag(p, "config", help="TOML config file (see config/default.toml)")
    _flag(p, "projects", nargs="+", help="projects to serve, e.g. maze driving")
    _flag(p, "model", help="local HF model directory")
    _flag(p, "quantization", help="auto|none|awq|gptq|bitsandbytes|fp8|compressed-tensors|...")
    _flag(p, "kv_cache_dtype", help="auto|fp8|...")
    _flag(p, "dtype", help="auto|bfloat16|float16|float32")
    _flag(p, "visible_devices", help="GPU indices for CUDA_VISIBLE_DEVICES, e.g. 0 or 2,3")
    _flag(p, "gpu_memory_utilization", type=float)
    _flag(p, "max_model_len", type=int)
    _flag(p, "max_num_seqs", type=int)
    _flag(p, "max_num_batched_tokens", type=int)
    _flag(p, "max_tokens", type=int, help="default answer length cap")
    _flag(p, "max_history_tokens", type=int)
    _flag(p, "enforce_eager", action=argparse.BooleanOptionalAction)
    _flag(p, "broker", help="mqtt://host:port or mqtts://host:port (default: embedded broker on 127.0.0.1:1883)")
    _flag(p, "port", type=int, help="port of the embedded broker (default 1883)")
    _flag(p, "mqtt_username")
    _flag(p, "mqtt_password", help="prefer the env var VLLM_WORKER_BROKER__PASSWORD (not in shell history)")
    _flag(p, "worker_id")
    _flag(p, "topic_prefix")
    _flag(p, "log_level", choices=["debug", "info", "warning", "error"])
    _flag(p, "engine", choices=["vllm", "fake"], help="fake: a scripted engine for tests and benchmarks")
    _flag(p, "model_index", type=int, help=argparse.SUPPRESS)  # a supervised child: serve [[models]][i]
    return p


def flags_to_config(args: argparse.Namespace) -> dict[str, Any]:
    """Nested config dict from the flags that were given (None = not given)."""
    mapping = {
        "projects": ("worker", "projects"),
        "model": ("model", "path"),
        "quantization": ("model", "quantization"),
        "kv_cache_dtype": ("model", "kv_cache_dtype"),
        "dtype": ("model", "dtype"),
        "visible_devices": ("model", "visible_devices"),
        "gpu_memory_utilization": ("model", "gpu_memory_utilization"),
        "max_model_len": ("model", "max_model_len"),
        "max_num_seqs": ("model", "max_num_seqs"),
        "max_num_batched_tokens": ("model", "max_num_batched_tokens"),
        "enforce_eager": ("model", "enforce_eager"),
        "max_tokens": ("generation", "max_tokens"),
        "max_history_tokens": ("sessions", "max_history_tokens"),
        "broker": ("broker", "url"),
        "port": ("broker", "embedded_port"),
        "mqtt_username": ("broker", "username"),
        "mqtt_password": ("broker", "password"),
        "worker_id": ("worker", "id"),
        "topic_prefix": ("worker", "topic_prefix"),
        "log_level": ("log", "level"),
    }
    out: dict[str, Any] = {}
    for flag, (section, key) in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _config_from(args: argparse.Namespace) -> WorkerConfig:
    file = args.config or os.environ.get("VLLM_WORKER_CONFIG")
    return load(Path(file) if file else None, os.environ, flags_to_config(args))


def _ensure_model(cfg: WorkerConfig) -> Path:
    model_dir = resolve_path(cfg.model.path)
    if Path(cfg.model.path) == Path(DEMO_DIR) and not is_prepared(model_dir, "bfloat16"):
        model_dir = ROOT / DEMO_DIR if not model_dir.is_absolute() else model_dir
        say("preparing the bundled demo model (once, ~20 s)")
        prepare_demo(model_dir, progress=say)
    check_model_dir(model_dir)
    return model_dir


def serve(argv: Sequence[str]) -> int:
    """Run a worker until SIGINT/SIGTERM."""
    args = serve_parser().parse_args(argv)
    from worker import log  # noqa: PLC0415 - keep `--help` fast
    from worker.projects import load_projects  # noqa: PLC0415
    from worker.service import Service  # noqa: PLC0415

    try:
        cfg = _config_from(args)
        log.setup(cfg.log)
        log.quiet_engine(cfg.log.level)
        if cfg.models and args.model_index is None:
            return _supervise(cfg, args)
        if args.model_index is not None:
            cfg = cfg.for_model(args.model_index, args.gpu_memory_utilization)
        projects = load_projects(cfg.worker.topics_dir, cfg.worker.projects)
        if args.engine == "fake":
            from worker.engine.fake import FakeEngine  # noqa: PLC0415

            engine: Any = FakeEngine(token_delay_s=float(os.environ.get("VLLM_WORKER_FAKE_TOKEN_DELAY_S", "0")))
        else:
            from worker.engine.vllm import VllmEngine  # noqa: PLC0415

            engine = VllmEngine(cfg.model, _ensure_model(cfg))
            say("checking model and quantization")
            engine.preflight()  # fail fast, exit 2, before any broker traffic or engine load
        service = Service(cfg, projects, engine, say=say)
        return asyncio.run(_run(service))
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG


def _supervise(cfg: WorkerConfig, args: argparse.Namespace) -> int:
    """Several `[[models]]`: one supervised worker process per model (see worker/supervisor.py)."""
    from worker.projects import load_projects  # noqa: PLC0415
    from worker.service import default_worker_id  # noqa: PLC0415
    from worker.supervisor import Supervisor  # noqa: PLC0415

    for entry in cfg.models:
        load_projects(cfg.worker.topics_dir, entry.projects)  # fail here, not in a restart loop
    # the file carries everything else; only these flags are passed on to every child
    extra = ["--engine", args.engine] if args.engine else []
    if args.log_level:
        extra += ["--log-level", args.log_level]
    base_id = cfg.worker.id or default_worker_id(None)
    file = Path(args.config or os.environ["VLLM_WORKER_CONFIG"])
    return asyncio.run(_run(Supervisor(cfg, file, base_id, extra, say)))


async def _run(service: Any) -> int:  # noqa: ANN401 - Service, imported lazily
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            say("second signal: exiting now")
            os._exit(128 + signum)
        stop.set()  # first: nothing after this line may keep the worker from stopping
        say(f"{signal.Signals(signum).name} received: draining")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    hint = asyncio.create_task(_next_steps(service))  # supervised: one line once ready, cancelled below
    try:
        code: int = await service.run(stop)
    finally:
        hint.cancel()
    say("stopped")
    return code


async def _next_steps(service: Any) -> None:  # noqa: ANN401 - Service, imported lazily
    """After `ready`, the commands a newcomer would try next."""
    await service.ready.wait()
    broker = f" --broker mqtt://127.0.0.1:{service.broker_port}" if service.broker_port not in (None, 1883) else ""
    project = service.projects[0]
    say(f"try: vllm-worker ask {project} 'Which way is out?'{broker}   |   vllm-worker fleet --once{broker}")


def ask(argv: Sequence[str]) -> int:
    """Publish one request and print the answer."""
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
        "--client-id",
        default=None,
        help="v2 clientId: sessions live in its namespace (default: the broker username, else cli-<user>)",
    )
    args = p.parse_args(argv)
    from worker import log  # noqa: PLC0415
    from worker.client import Client  # noqa: PLC0415
    from worker.config import LogConfig  # noqa: PLC0415

    log.setup(LogConfig(level="warning"))  # stdout carries only the answer

    fields = {k: v for k, v in {"maxTokens": args.max_tokens, "temperature": args.temperature}.items() if v is not None}

    async def go() -> int:
        username = os.environ.get("VLLM_WORKER_BROKER__USERNAME")
        broker = BrokerConfig(
            url=args.broker, username=username, password=os.environ.get("VLLM_WORKER_BROKER__PASSWORD")
        )
        # One identity across invocations, so `--session s1` twice continues one conversation (v2 sessions
        # live in their clientId's namespace); a fresh MQTT connection id each time, so two never collide.
        client_id = args.client_id or username or _cli_identity()
        async with Client(broker, client_id, connection_id=f"{client_id}-{uuid.uuid4().hex[:8]}") as client:
            if not args.stream:
                reply = await client.ask(
                    args.project, args.message, session=args.session, timeout_s=args.timeout, **fields
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
        if not reply.ok:
            say(f"error {reply.error_code}: {reply.error_message}")
            return 1
        print(reply.text)
        return 0

    try:
        return asyncio.run(go())
    except TimeoutError:
        say(f"no answer within {args.timeout:.0f} s (is a worker serving {args.project!r} on {args.broker}?)")
        return 1
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG


def _cli_identity() -> str:
    """`cli-<login name>`, reduced to the id alphabet of PROTOCOL section 1."""
    user = re.sub(r"[^A-Za-z0-9_.:-]", "", getpass.getuser())[:60] or "user"
    return f"cli-{user}"


def model(argv: Sequence[str]) -> int:
    """Model utilities: `prepare` converts the bundled demo model once."""
    p = argparse.ArgumentParser(prog="vllm-worker model")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert the bundled SmolLM2-135M-Instruct GGUF to a HF dir (idempotent)")
    prep.add_argument("--out", default=str(ROOT / DEMO_DIR))
    prep.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    quant = sub.add_parser("quantize", help="make a 4-bit AWQ/GPTQ checkpoint with auto-round (own venv, cached)")
    quant.add_argument("--method", choices=["awq", "gptq"], required=True)
    quant.add_argument("--src", default=str(ROOT / DEMO_DIR), help="HF model dir (default: the demo model)")
    quant.add_argument("--out", default=None, help="default: <src>-<method>")
    args = p.parse_args(argv)
    try:
        if args.action == "quantize":
            from worker.checkpoints import quantize  # noqa: PLC0415

            src = Path(args.src)
            quantize(src, Path(args.out or f"{src}-{args.method}"), args.method, say)
            return 0
        prepare_demo(Path(args.out), args.dtype, progress=say)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    return 0


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
    args = p.parse_args(argv)
    from worker import log  # noqa: PLC0415
    from worker.config import LogConfig  # noqa: PLC0415

    log.setup(LogConfig(level="warning"))
    try:
        return asyncio.run(_fleet(args))
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG


async def _fleet(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from worker.bus import Bus  # noqa: PLC0415
    from worker.fleet import FleetState, PrometheusCollector, render  # noqa: PLC0415

    state = FleetState(topic_prefix=args.topic_prefix)
    if args.prometheus:
        from prometheus_client import REGISTRY, start_http_server  # noqa: PLC0415

        REGISTRY.register(PrometheusCollector(state))
        start_http_server(args.prometheus, addr=args.prometheus_host)
        say(f"prometheus metrics on http://{args.prometheus_host}:{args.prometheus}/metrics")
    broker = BrokerConfig(
        url=args.broker,
        username=os.environ.get("VLLM_WORKER_BROKER__USERNAME"),
        password=os.environ.get("VLLM_WORKER_BROKER__PASSWORD"),
    )
    async with Bus(broker, f"fleet-{uuid.uuid4().hex[:8]}") as bus:

        async def read() -> None:
            while True:
                msg = await bus.messages()
                bus.ack(msg)
                state.handle(msg.topic, msg.payload)

        reader = asyncio.create_task(read())
        await bus.subscribe(state.filters)
        if args.once:
            await asyncio.sleep(args.wait)
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
            while not stop.is_set():
                live.update(render(state))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        reader.cancel()
    return 0


def plan(argv: Sequence[str]) -> int:
    """VRAM planner: weights, KV cache and gpu_memory_utilization for models sharing one GPU."""
    p = argparse.ArgumentParser(prog="vllm-worker plan", description="Plan GPU memory for one or more models.")
    p.add_argument("models", nargs="+", help="local model dir or alias (config/models/), optionally :awq|gptq|fp8|bnb4")
    p.add_argument("--gpu-mem", default="96GiB", help="GPU memory, e.g. 96GiB or 80GB")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-dtype", default="auto", help="auto|fp8")
    p.add_argument("--min-seqs", type=int, default=4, help="full-length sequences each engine must hold")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from worker import plan as planner  # noqa: PLC0415

    try:
        specs = [planner.load_spec(m) for m in args.models]
        result = planner.plan(
            specs,
            planner.parse_size(args.gpu_mem),
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_dtype=args.kv_dtype,
            min_seqs=args.min_seqs,
        )
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    if args.json:
        print(result.to_json())
        return 0 if result.fits else 1
    title = (
        f"{result.gpu_mem_gib:.0f} GiB GPU ({result.usable_gib:.0f} usable), "
        f"max_model_len {result.max_model_len}, KV {result.kv_dtype}"
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vllm-worker` console script."""
    from worker.log import guard_std_streams  # noqa: PLC0415 - keep `--help` fast

    guard_std_streams()  # a closed stdout/stderr must never break shutdown or serving
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    handlers = {"serve": serve, "ask": ask, "model": model, "fleet": fleet, "plan": plan, "bench": bench}
    return handlers[command](rest)


if __name__ == "__main__":
    sys.exit(main())
