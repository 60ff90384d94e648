"""Quantize a HF model directory to AWQ or GPTQ 4-bit with auto-round (RTN, iters=0), on CPU.

Runs inside the side venv made by `vllm-worker model quantize` (auto-round moves torch/transformers
versions, so it never shares the runtime venv). Standalone: imports nothing from `worker`.
Usage: python autoround_quantize.py SRC OUT --format auto_awq|auto_gptq [--group-size 64]
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import tempfile
from pathlib import Path


def calibration_texts(count: int) -> list[str]:
    """Offline calibration text (no dataset downloads): Python standard-library sources."""
    texts: list[str] = []
    for path in sorted(Path(inspect.getfile(json)).parent.parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if len(text) > 4000:  # noqa: PLR2004 - long enough for seqlen 128 tokens
            texts.append(text[:6000])
        if len(texts) >= count:
            break
    return texts


def main() -> int:
    """Quantize SRC into OUT."""
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=["auto_awq", "auto_gptq"], required=True)
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    import torch  # noqa: PLC0415
    from auto_round import AutoRound  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.src)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=Path(args.out).parent))
    try:
        rounder = AutoRound(
            model,
            tokenizer=tok,
            scheme="W4A16",
            bits=4,
            group_size=args.group_size,
            sym=args.format == "auto_gptq",  # vLLM's CPU GPTQ path needs symmetric (uint4b8)
            iters=0,
            device_map="cpu",
            dataset=calibration_texts(32),
            nsamples=32,
            seqlen=128,
        )
        rounder.quantize_and_save(str(work), format=args.format)
        # auto-round writes into a sub-directory named after the model; move its content to OUT
        produced = next(p.parent for p in work.rglob("config.json"))
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(produced), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stderr.write(f"quantized model written to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
