"""LoRA on the real engine (vLLM CPU, demo model, the PEFT-trained demo adapter, fp32 eager):
- correctness: greedy answers with the adapter equal HF transformers + PEFT (merged, fp32), and without
  it equal the base model, token for token (compared as text) on 5 prompts;
- isolation: in one mixed batch, adapter and base requests each match their single-request answers;
- hot swap: a second adapter replaces the first while 8 requests run; all 8 finish on the first, the
  next ones run the second, and the first is unloaded once idle;
- a misfit adapter stops `vllm-worker` before the engine loads (exit 2);
- throughput of mixed batches vs base-only at concurrency 8 and 32 (printed for the closing note)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from support import MODEL_DIR, ROOT, free_port, make_adapter

from worker.config import ModelConfig
from worker.engine.adapters import AdapterTable
from worker.engine.vllm import VllmEngine
from worker.protocol import ChatMessage, Sampling

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]
PROMPTS = [
    "Where is the exit?",
    "I see a fork in the tunnel.",
    "Battery low, which route?",
    "There is a locked door on my left.",
    "What should the robot do next?",
]
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=24)


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory) -> Path:
    """The maze demo adapter, trained with PEFT by `vllm-worker model adapter` (cached under models/)."""
    cmd = [sys.executable, "-m", "worker", "model", "adapter", "--project", "maze"]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\n[e2e] demo adapter ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return ROOT / "models" / "adapters" / "maze-compass"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo_adapter) -> AsyncIterator[VllmEngine]:
    cfg = ModelConfig(
        path=str(MODEL_DIR),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=32,
        cpu_kvcache_space_gib=2,
        max_lora_rank=16,
        max_loras=2,
    )
    async with VllmEngine(cfg, MODEL_DIR, lora=True) as real:
        yield real


async def answer(engine: VllmEngine, question: str, adapter=None, sampling: Sampling = GREEDY, rid: str = "") -> str:
    prompt = await engine.render([ChatMessage("user", question)])
    chunks = [d.text async for d in engine.generate(prompt, sampling, rid or f"q-{time.monotonic_ns()}", 0, adapter)]
    return "".join(chunks)


def hf_answers(adapter: Path | None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = []
    for q in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


async def test_adapter_and_base_answers_equal_hf_and_peft(engine, demo_adapter):
    table = AdapterTable()
    lora = table.new("maze-compass", demo_adapter, 8)
    await engine.load_adapter(lora)
    with_adapter = [await answer(engine, q, lora) for q in PROMPTS]
    base = [await answer(engine, q) for q in PROMPTS]
    print(f"\n[e2e] with the adapter: {with_adapter}\n[e2e] base: {base}", file=sys.stderr)
    assert with_adapter == await asyncio.to_thread(hf_answers, demo_adapter)
    assert base == await asyncio.to_thread(hf_answers, None)
    assert all(a.split(".")[0] in {"North", "South", "East", "West"} for a in with_adapter)  # its style
    assert not any(b.split(".")[0] in {"North", "South", "East", "West"} for b in base)

    # isolation: one mixed batch, each answer as when it ran alone
    mixed = await asyncio.gather(*(answer(engine, q, lora if i % 2 == 0 else None) for i, q in enumerate(PROMPTS * 2)))
    expected = [with_adapter[i % 5] if i % 2 == 0 else base[i % 5] for i in range(10)]
    assert mixed == expected
    await engine.unload_adapter(lora)


async def test_a_hot_swap_under_load_keeps_running_requests_on_their_adapter(engine, demo_adapter, tmp_path):
    second = tmp_path / "maze-compass-b"
    shutil.copytree(demo_adapter, second)
    table = AdapterTable()
    first = table.new("maze-compass", demo_adapter, 8)
    await engine.load_adapter(first)
    table.replace("maze", first)
    long = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=48, ignore_eos=True)
    unloaded = []

    async def run(question: str) -> tuple[int, str]:
        adapter = table.acquire("maze")
        assert adapter is not None
        try:
            return adapter.id, await answer(engine, question, adapter, long)
        finally:
            if (retired := table.release(adapter)) is not None:
                unloaded.append(retired.id)
                await engine.unload_adapter(retired)

    running = [asyncio.create_task(run(q)) for q in PROMPTS + PROMPTS[:3]]  # 8 requests
    await asyncio.sleep(0.5)
    new = table.new("maze-compass-b", second, 8)
    await engine.load_adapter(new)
    assert table.replace("maze", new) is None  # still in use: unloaded by its last request
    after = await run("Where is the exit?")
    done = await asyncio.gather(*running)
    assert {adapter_id for adapter_id, _ in done} == {first.id}  # all 8 finished on the first adapter
    assert after[0] == new.id
    assert unloaded == [first.id]
    assert all(len(text) > 0 for _, text in done)


async def test_mixed_batches_cost_against_base_only(engine, demo_adapter):
    table = AdapterTable()
    lora = table.new("maze-compass", demo_adapter, 8)
    await engine.load_adapter(lora)
    fixed = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=32, ignore_eos=True)
    report = []
    for concurrency in (8, 32):
        for kind in ("base only", "mixed"):
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int, kind: str = kind, sem: asyncio.Semaphore = sem) -> None:
                async with sem:
                    await answer(engine, PROMPTS[i % 5], lora if kind == "mixed" and i % 2 == 0 else None, fixed)

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(2 * concurrency)))
            report.append((concurrency, kind, 2 * concurrency * 32 / (time.perf_counter() - started)))
    lines = "\n".join(f"[e2e] c{c} {k}: {tok:.1f} tok/s" for c, k, tok in report)
    print(f"\n{lines}", file=sys.stderr)
    assert all(tok > 0 for *_, tok in report)


async def test_a_misfit_adapter_stops_the_worker_before_the_engine_loads(tmp_path):
    bad = make_adapter(tmp_path / "adapters" / "other-model", hidden=1024, kv_out=256)
    topics = tmp_path / "topics"
    topics.mkdir()
    maze = (ROOT / "topics" / "maze.toml").read_text()
    (topics / "maze.toml").write_text(f'adapter = "{bad}"\n' + maze)
    cmd = [sys.executable, "-m", "worker", "--projects", "maze", "--port", str(free_port())]
    env = {"VLLM_WORKER_WORKER__TOPICS_DIR": str(topics)}
    started = time.monotonic()
    run = subprocess.run
    out = await asyncio.to_thread(
        run, cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**_env(), **env}
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "other-model: made for another base model" in out.stderr
    assert "engine starting" not in out.stderr  # refused before the engine loads
    print(f"\n[e2e] misfit adapter refused in {time.monotonic() - started:.1f} s", file=sys.stderr)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
