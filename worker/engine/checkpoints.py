"""Pre-quantized checkpoints made on this machine: `vllm-worker model quantize --method awq|gptq`.

auto-round (RTN, iters=0, group size 64: the demo model's hidden size 576 is not a multiple of 128)
runs in its own venv `.venv-quant`, because quantization tools move torch/transformers versions; the
runtime venv only ever loads the produced directory. Results are cached: a finished output directory
carries a marker naming its source and method, and is not rebuilt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker.config import ROOT
from worker.engine.models import make_readable
from worker.errors import ConfigError

QUANT_VENV = ROOT / ".venv-quant"
# The CPU torch wheel the machine's pip finds locally; auto-round runs on it.
QUANT_REQUIREMENTS = ("torch==2.13.0", "auto-round>=0.15")
FORMATS = {"awq": "auto_awq", "gptq": "auto_gptq"}
MARKER = ".vllm-worker-quant.json"
TOOL = Path(__file__).resolve().parent.parent / "tools" / "autoround_quantize.py"

Say = Callable[[str], None]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - our own argv
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise ConfigError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def ensure_venv(say: Say) -> Path:
    """The side venv with auto-round (created once, ~40 s)."""
    python = QUANT_VENV / "bin" / "python"
    stamp = QUANT_VENV / ".installed"
    if stamp.is_file():
        return python
    say(f"creating {QUANT_VENV.name} for auto-round (once, ~40 s)")
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(QUANT_VENV)], "creating the quantization venv")
    _run([str(python), "-m", "pip", "install", "-q", *QUANT_REQUIREMENTS], "installing auto-round")
    stamp.write_text(" ".join(QUANT_REQUIREMENTS), encoding="utf-8")
    return python


def is_done(out: Path, src: Path, method: str) -> bool:
    """True when `out` already holds `method` made from `src`."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(marker == {"source": str(src.resolve()), "method": method})


def quantize(src: Path, out: Path, method: str, say: Say) -> Path:
    """Make (or reuse) a 4-bit `method` checkpoint of the HF model at `src`."""
    if method not in FORMATS:
        raise ConfigError(f"--method must be one of {sorted(FORMATS)}")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a HF model directory (no config.json); run `vllm-worker model prepare`")
    if is_done(out, src, method):
        make_readable(out)  # also repairs what an earlier version left 0600
        say(f"{method} checkpoint ready at {out} (cached)")
        return out
    python = ensure_venv(say)
    say(f"quantizing {src.name} to {method} (auto-round RTN, group size 64)")
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([str(python), str(TOOL), str(src), str(out), "--format", FORMATS[method]], f"auto-round {method}")
    (out / MARKER).write_text(json.dumps({"source": str(src.resolve()), "method": method}), encoding="utf-8")
    make_readable(out)  # safetensors wrote 0600: the container's non-root user must read it
    say(f"{method} checkpoint ready at {out} ({time.perf_counter() - started:.0f} s)")
    return out


ADAPTER_TOOL = Path(__file__).resolve().parent.parent / "tools" / "train_adapter.py"
ADAPTER_META = "vllm_worker_adapter.json"
DEMO_ADAPTERS = {"maze": "maze-compass"}
"""Projects with a shipped demo data set (worker/tools/data/) and the adapter it trains."""


def demo_adapter(project: str, src: Path, adapters_dir: Path, say: Say) -> Path:
    """Train (or reuse) the project's demo LoRA for the model at `src` with PEFT (~1 min on 2 cores)."""
    if project not in DEMO_ADAPTERS:
        raise ConfigError(f"no demo adapter data for project {project!r} (there is for: {', '.join(DEMO_ADAPTERS)})")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a HF model directory (no config.json); run `vllm-worker model prepare`")
    out = adapters_dir / DEMO_ADAPTERS[project]
    try:
        meta = json.loads((out / ADAPTER_META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        meta = {}
    if meta.get("base") == src.name and (out / "adapter_model.safetensors").is_file():
        make_readable(out)  # also repairs what an earlier version left 0600
        say(f"adapter ready at {out} (cached)")
        return out
    say(f"training the {project} demo adapter on {src.name} with PEFT (LoRA rank 8, ~1 min on 2 cores)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ADAPTER_TOOL), "--base", str(src), "--out", str(out)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:  # noqa: S603
        assert proc.stdout is not None  # noqa: S101
        for line in proc.stdout:
            say(line.rstrip())  # one line per 20 steps: the progress
        err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise ConfigError(f"training the adapter failed (exit {proc.returncode}):\n{err[-2000:]}")
    make_readable(out)  # PEFT's safetensors are 0600: the worker may run as another user
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    say(f'adapter ready at {out}: set `adapter = "{shown}"` in topics/{project}.toml')
    return out
