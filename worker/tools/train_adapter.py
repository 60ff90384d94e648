"""Train the demo LoRA adapter (`vllm-worker model adapter --project maze`) with PEFT, on the CPU.

A rank-8 LoRA on the attention projections of the demo model, trained on a tiny shipped text set
(`data/maze_compass.json`: maze questions whose answers start with a compass direction), so that the
maze project's answers get a recognisable style. Run as a script in the worker's venv (torch, transformers
and peft are imported only here); prints one progress line per step group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("data") / "maze_compass.json"


def main() -> int:
    """Train and save the adapter (see the module docstring)."""
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model: Any = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    pairs = json.loads(DATA.read_text(encoding="utf-8"))["pairs"]
    batches = [_encode(tokenizer, pair) for pair in pairs]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == args.steps:
            took = time.monotonic() - started
            sys.stdout.write(f"step {step}/{args.steps}: loss {loss.item():.3f} ({took:.0f} s)\n")
            sys.stdout.flush()
    model.save_pretrained(args.out)
    meta = {"base": Path(args.base).name, "data": DATA.name, "steps": args.steps, "rank": args.rank}
    (Path(args.out) / "vllm_worker_adapter.json").write_text(json.dumps(meta), encoding="utf-8")
    return 0


def _encode(tokenizer: object, pair: dict[str, str]) -> tuple[object, object]:
    """Chat-formatted ids; the loss counts only the assistant's answer."""
    import torch  # noqa: PLC0415

    prompt = [{"role": "user", "content": pair["user"]}]
    full = [*prompt, {"role": "assistant", "content": pair["assistant"]}]
    template = tokenizer.apply_chat_template  # type: ignore[attr-defined]
    head = tokenizer.encode(template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)  # type: ignore[attr-defined]
    ids = tokenizer.encode(template(full, tokenize=False), add_special_tokens=False)  # type: ignore[attr-defined]
    labels = [-100] * len(head) + ids[len(head) :]
    return torch.tensor([ids]), torch.tensor([labels])


if __name__ == "__main__":
    sys.exit(main())
