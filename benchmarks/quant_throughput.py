"""Throughput of each quantization path on this machine (the bare engine, same prompts, 64 tokens).

    .venv/bin/python benchmarks/quant_throughput.py [--methods bf16,bitsandbytes,awq,gptq]

awq/gptq checkpoints are made (or reused) with `vllm-worker model quantize`. Prints a markdown table:
method, what vLLM reports, start-to-ready, tok/s at concurrency 1 and 8, and the kernel a GPU would use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "smollm2-135m-instruct"
GPU_KERNEL = {
    "bf16": "dense bf16/fp16 (cuBLAS)",
    "bitsandbytes": "bitsandbytes 4-bit (plugin; bnb CUDA kernels)",
    "awq": "awq_marlin (Marlin, compute capability >= 7.5)",
    "gptq": "gptq_marlin (Marlin, compute capability >= 7.5)",
}


def run(method: str, levels: list[dict[str, int]], chats: list[list[dict[str, str]]]) -> dict[str, object]:
    model, quant = DEMO, None
    if method in ("awq", "gptq"):
        model = DEMO.parent / f"{DEMO.name}-{method}"
        subprocess.run(
            [sys.executable, "-m", "worker", "model", "quantize", "--method", method, "--out", str(model)],
            cwd=ROOT,
            check=True,
        )
    if method == "bitsandbytes":
        quant = "bitsandbytes"
    spec = {"model": str(model), "levels": levels, "chats": chats, "max_tokens": 64, "quantization": quant}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "direct_engine.py"), json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    row: dict[str, object] = {"method": method}
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        data = json.loads(line)
        if "quantization" in data:
            row["reported"] = data["quantization"]
        elif "ready" in data:
            row["start_s"] = round(time.perf_counter() - started, 1)
        elif "level" in data:
            tokens = sum(s["tokens"] for s in data["samples"])
            row[f"c{data['level']['concurrency']}"] = round(tokens / data["wall_s"], 1)
    proc.wait()
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="bf16,bitsandbytes,awq,gptq")
    args = p.parse_args()
    data = json.loads((ROOT / "benchmarks" / "data" / "prompts.json").read_text())
    chats = [[{"role": "user", "content": q}] for q in data["prompts"]]
    levels = [{"concurrency": 1, "requests": 4}, {"concurrency": 8, "requests": 16}]
    rows = [run(m, levels, chats) for m in args.methods.split(",")]
    print(
        "| method | vLLM reports | start (s) | tok/s c1 | tok/s c8 | GPU kernel (expected) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r.get('reported')} | {r.get('start_s')} | {r.get('c1')} | {r.get('c8')} | "
            f"{GPU_KERNEL[str(r['method'])]} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
