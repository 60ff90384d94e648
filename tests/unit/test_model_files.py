"""What `model prepare`, `model quantize` and `model adapter` write is world-readable (files 0644, dirs 0755).

safetensors writes 0600 whatever the umask, and the worker may read the tree as another user (the
container's uid 10001 on a read-only mount, a systemd `User=`). Each writer runs here for real on tiny
stand-ins (a fake transformers for the conversion, tiny scripts for the auto-round and PEFT tools)
under umask 077, so nothing comes out readable by accident.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from worker.engine import checkpoints, models
from worker.engine.models import make_readable, prepare_demo

# The tools' stand-ins: each writes what the real one does (a safetensors file through safetensors itself).
TOOL = """
import os, sys
import numpy as np
from safetensors.numpy import save_file
out = sys.argv[2]
os.makedirs(out)
save_file({"w": np.zeros(4, dtype=np.float32)}, os.path.join(out, "model.safetensors"))
"""
ADAPTER_TOOL = """
import argparse, json, os
import numpy as np
from safetensors.numpy import save_file
p = argparse.ArgumentParser()
p.add_argument("--base")
p.add_argument("--out")
args = p.parse_args()
os.makedirs(args.out)
save_file({"w": np.zeros(4, dtype=np.float32)}, os.path.join(args.out, "adapter_model.safetensors"))
with open(os.path.join(args.out, "vllm_worker_adapter.json"), "w") as f:
    json.dump({"base": os.path.basename(args.base)}, f)
print("step 1/1")
"""


@pytest.fixture(autouse=True)
def strict_umask() -> Iterator[None]:
    """Umask 077 (a hardened root shell): the helper must not depend on the umask (children inherit it)."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything under it, by relative path."""
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def assert_readable(root: Path) -> None:
    expected = {p.relative_to(root).as_posix(): 0o755 if p.is_dir() else 0o644 for p in [root, *root.rglob("*")]}
    assert modes(root) == expected


def tiny_safetensors(path: Path) -> None:
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(path))


def test_make_readable_opens_the_tree_and_leaves_symlinked_files_alone(tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("x")
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    tiny_safetensors(root / "sub" / "model.safetensors")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    (root / "link").symlink_to(outside)
    make_readable(root)
    assert modes(root)["sub"] == 0o755
    assert modes(root)["sub/model.safetensors"] == 0o644
    assert modes(root)["run.sh"] == 0o744  # bits are only added: the owner keeps its execute bit
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target is not ours to open


def fake_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that writes what the real one does (safetensors, config, tokenizer) without a model."""

    class Model:
        config = SimpleNamespace()
        hf_quantizer = None

        def save_pretrained(self, out: Path) -> None:
            tiny_safetensors(Path(out) / "model.safetensors")
            (Path(out) / "config.json").write_text("{}")

    class Tokenizer:
        def save_pretrained(self, out: Path) -> None:
            (Path(out) / "tokenizer.json").write_text("{}")

    torch = ModuleType("torch")
    torch.bfloat16 = torch.float32 = torch.float16 = object()
    transformers = ModuleType("transformers")
    transformers.AutoModelForCausalLM = SimpleNamespace(from_pretrained=lambda *_a, **_k: Model())
    transformers.AutoTokenizer = SimpleNamespace(from_pretrained=lambda *_a, **_k: Tokenizer())
    utils = ModuleType("transformers.utils")
    utils.logging = SimpleNamespace(set_verbosity_error=lambda: None)
    for name, module in {"torch": torch, "transformers": transformers, "transformers.utils": utils}.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_model_prepare_writes_a_world_readable_model(tmp_path, monkeypatch):
    fake_transformers(monkeypatch)
    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "demo.gguf")
    out = prepare_demo(tmp_path / "models" / "demo")
    assert (out / "model.safetensors").is_file()
    assert_readable(out)


def test_model_prepare_repairs_a_tree_an_earlier_version_left_private(tmp_path, monkeypatch):
    fake_transformers(monkeypatch)
    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "demo.gguf")
    out = prepare_demo(tmp_path / "demo")
    for path in [out, *out.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    assert prepare_demo(out) == out  # cached: nothing is converted again
    assert_readable(out)


def test_model_quantize_writes_a_world_readable_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "tool.py").write_text(textwrap.dedent(TOOL))
    monkeypatch.setattr(checkpoints, "TOOL", tmp_path / "tool.py")
    monkeypatch.setattr(checkpoints, "ensure_venv", lambda _say: Path(sys.executable))
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = checkpoints.quantize(src, tmp_path / "src-awq", "awq", lambda _msg: None)
    assert (out / "model.safetensors").is_file()
    assert_readable(out)


def test_model_adapter_writes_a_world_readable_adapter(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(textwrap.dedent(ADAPTER_TOOL))
    monkeypatch.setattr(checkpoints, "ADAPTER_TOOL", tmp_path / "train.py")
    src = tmp_path / "base"
    src.mkdir()
    (src / "config.json").write_text("{}")
    out = checkpoints.demo_adapter("maze", src, tmp_path / "adapters", lambda _msg: None)
    assert (out / "adapter_model.safetensors").is_file()
    assert_readable(out)
