"""Command line: `vllm-worker [serve]` and `vllm-worker model`; `ask`, `fleet`, `plan`, `bench` are in `commands`.

Flags of the old one-file script are accepted in both underscore and dash form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__
from worker.cli.terminal import EXIT_CONFIG, say
from worker.config import ROOT, WorkerConfig, load, resolve_path
from worker.engine.models import DEMO_DIR, check_model_dir, is_prepared, prepare_demo
from worker.errors import ConfigError
from worker.transport import eventloop

COMMANDS = ("serve", "ask", "model", "fleet", "console", "plan", "bench", "usage")


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
    _flag(p, "tensor_parallel_size", type=int, help="split the model across this many GPUs (vLLM TP)")
    _flag(p, "pipeline_parallel_size", type=int, help="pipeline stages (vLLM PP), e.g. one per node")
    _flag(p, "distributed_executor_backend", choices=["mp", "ray"], help="mp: this host; ray: a Ray cluster")
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
        "tensor_parallel_size": ("model", "tensor_parallel_size"),
        "pipeline_parallel_size": ("model", "pipeline_parallel_size"),
        "distributed_executor_backend": ("model", "distributed_executor_backend"),
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
    return load(Path(file) if file else None, flags_to_config(args))


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
            from worker.engine.fake import SCRIPTS, FakeEngine  # noqa: PLC0415

            script = os.environ.get("VLLM_WORKER_FAKE_SCRIPT", "echo")  # history: the chaos run's oracle
            engine: Any = FakeEngine(
                SCRIPTS.get(script, SCRIPTS["echo"]),
                token_delay_s=float(os.environ.get("VLLM_WORKER_FAKE_TOKEN_DELAY_S", "0")),
                log_generations=script == "history",
                start_s=float(os.environ.get("VLLM_WORKER_FAKE_START_S", "0")),
                prefix_cache=os.environ.get("VLLM_WORKER_FAKE_PREFIX_CACHE") == "1",
            )
        else:
            from worker.engine.vllm import VllmEngine  # noqa: PLC0415

            model_dir = _ensure_model(cfg)
            engine = VllmEngine(cfg.model, model_dir, lora=any(p.adapter for p in projects.values()))
            say("checking model and quantization")
            engine.preflight()  # fail fast, exit 2, before any broker traffic or engine load
            _check_adapters(cfg, projects, model_dir)
        service = Service(cfg, projects, engine, say=say)
        return eventloop.run(_run(service), cfg.worker.event_loop)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG


def _check_adapters(cfg: WorkerConfig, projects: dict[str, Any], model_dir: Path) -> None:
    """Every configured LoRA adapter against the model, before the engine loads (ConfigError: exit 2)."""
    from worker.engine import adapters  # noqa: PLC0415

    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    for name, project in projects.items():
        if project.adapter is not None:
            say(f"checking adapter {project.adapter} for project {name}")
            adapters.check(resolve_path(project.adapter), model_config, max_lora_rank=cfg.model.max_lora_rank)


def _supervise(cfg: WorkerConfig, args: argparse.Namespace) -> int:
    """Several `[[models]]`: one supervised worker process per model (see worker/fleet/supervisor.py)."""
    from worker.fleet.supervisor import Supervisor  # noqa: PLC0415
    from worker.projects import load_projects  # noqa: PLC0415
    from worker.service import default_worker_id  # noqa: PLC0415

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
    adapter = sub.add_parser("adapter", help="train a project's demo LoRA adapter with PEFT (cached)")
    adapter.add_argument("--project", default="maze")
    adapter.add_argument("--src", default=str(ROOT / DEMO_DIR), help="base model dir (default: the demo model)")
    adapter.add_argument("--out-dir", default=str(ROOT / "models" / "adapters"))
    args = p.parse_args(argv)
    try:
        if args.action == "adapter":
            from worker.engine.checkpoints import demo_adapter  # noqa: PLC0415

            demo_adapter(args.project, Path(args.src), Path(args.out_dir), say)
            return 0
        if args.action == "quantize":
            from worker.engine.checkpoints import quantize  # noqa: PLC0415

            src = Path(args.src)
            quantize(src, Path(args.out or f"{src}-{args.method}"), args.method, say)
            return 0
        prepare_demo(Path(args.out), args.dtype, progress=say)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vllm-worker` console script."""
    from worker.log import guard_std_streams  # noqa: PLC0415 - keep `--help` fast

    guard_std_streams()  # a closed stdout/stderr must never break shutdown or serving
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    from worker.cli import commands, console_command  # noqa: PLC0415 - the client-side subcommands, on demand

    handlers = {
        "serve": serve,
        "model": model,
        "ask": commands.ask,
        "fleet": commands.fleet,
        "console": console_command.console,
        "plan": commands.plan,
        "bench": commands.bench,
        "usage": commands.usage,
    }
    return handlers[command](rest)


if __name__ == "__main__":
    sys.exit(main())
