"""Tensor parallelism on the CPU engine (issue 20). The demo model (9 attention heads) cannot split in two:
the worker refuses tp 2 before load. A tiny Llama with 4 heads (random weights, the demo's tokenizer,
built here) shows the split itself: greedy fp32 answers with tp 2 (two CPU ranks, one core each) equal
tp 1 token for token. Ray: a local cluster is reachable, and on CPU the worker refuses the ray executor
before load, as vLLM's CPU platform cannot run it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import launch_worker
from support import MODEL_DIR, ROOT, free_port

from worker.client import Client
from worker.config import BrokerConfig

pytestmark = pytest.mark.e2e
PROMPTS = ["Which way is out?", "Turn left or right?", "Describe the maze."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    demo = json.loads((MODEL_DIR / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=demo["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=demo.get("bos_token_id"),
        eos_token_id=demo.get("eos_token_id"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    with torch.no_grad():  # special tokens score 0 while random words win: every answer is 16 visible tokens
        model.lm_head.weight[: len(tokenizer.get_added_vocab())] = 0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def answers(port: int) -> list[str]:
    async def ask() -> list[str]:
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as c:
            replies = [
                await c.ask("maze", p, session=f"s{i}", temperature=0, maxTokens=16, timeout_s=120)
                for i, p in enumerate(PROMPTS)
            ]
        assert all(r.ok and r.raw["usage"]["completionTokens"] == 16 for r in replies), replies
        return [r.text for r in replies]

    return asyncio.run(ask())


def test_the_demo_model_is_refused_at_tp_2_before_load():
    cmd = [sys.executable, "-m", "worker", "--tensor-parallel-size", "2", "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "9 attention heads are not divisible by tensor_parallel_size 2" in out.stderr


def test_tp_2_on_two_cpu_ranks_answers_like_tp_1(tiny_model):
    common = ["--model", str(tiny_model), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
    with launch_worker(*common, worker_id="tp1") as w:
        one = answers(w.port)
    with launch_worker(*common, "--tensor-parallel-size", "2", worker_id="tp2") as w:
        two = answers(w.port)
        assert "engine.parallel" in w.log()
        assert "tp2" in w.log()
    print(f"\n[e2e] tp1 == tp2 on {len(PROMPTS)} prompts: {one!r}", file=sys.stderr)
    assert two == one


@pytest.mark.ray
def test_a_local_ray_cluster_answers_and_the_cpu_engine_refuses_ray_before_load():
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
    from worker.engine.parallel import Layout, check_ray

    started = time.monotonic()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp)
    try:
        assert ray.get(ray.remote(lambda x: 2 * x).remote(21)) == 42  # a single-node cluster that runs tasks
        check_ray(Layout(1, 1, "ray"))  # what the worker's pre-flight asks: it answers, with its resources
        cmd = [sys.executable, "-m", "worker", "--distributed-executor-backend", "ray", "--port", str(free_port())]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "CPU backend cannot run the ray executor" in out.stderr
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    took = time.monotonic() - started
    print(f"\n[e2e] ray: local cluster up, checked and the CPU engine refused it in {took:.1f} s", file=sys.stderr)
