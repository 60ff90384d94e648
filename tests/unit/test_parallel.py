"""Tensor/pipeline parallelism: pre-flight refusals, per-GPU sizes by vLLM's own sharding rules (checked
against vLLM's functions where it has them), planner rows for the seed models, and GPU groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from worker.config import WorkerConfig
from worker.engine.parallel import Layout, check, cpu_binding, pp_partitions, rank_bytes
from worker.engine.plan import GIB, load_spec, param_counts, plan, weight_bytes
from worker.errors import ConfigError
from worker.fleet.supervisor import plan_models

DEMO = (
    json.loads((ROOT / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    if (ROOT / "models" / "smollm2-135m-instruct" / "config.json").exists()
    else json.loads((ROOT / "config" / "models" / "mistral-7b.json").read_text())
)
SEEDS = ("deepseek-coder-33b", "qwen2.5-coder-32b")


def alias(name: str) -> dict:
    return json.loads((ROOT / "config" / "models" / f"{name}.json").read_text())


# ---- pre-flight: every misfit is refused before load, in one sentence --------------------------------------
@pytest.mark.parametrize(
    ("layout", "config", "gpus", "cores", "method", "says"),
    [
        (Layout(2), {**alias("mistral-7b"), "num_attention_heads": 9}, 2, 2, "none", "9 attention heads"),
        (Layout(3), {**alias("mistral-7b"), "num_attention_heads": 24}, 3, 3, "none", "8 KV heads"),
        (Layout(1, 3), alias("mistral-7b"), 3, 3, "none", "32 layers do not split evenly"),
        (Layout(1, 64), alias("mistral-7b"), 64, 64, "none", "exceeds the model's 32 layers"),
        (Layout(2), alias("mistral-7b"), 1, 2, "none", "needs 2 GPUs on this host but 1 are visible"),
        (Layout(2), alias("mistral-7b"), None, 1, "none", "has 1 usable core"),
        (Layout(2, backend="ray"), alias("mistral-7b"), None, 4, "none", "CPU backend cannot run the ray"),
        # Llama-2-7B's MLP (11008) at tp 4: 2752 inputs per down_proj shard, not a multiple of 128
        (Layout(4), {**alias("mistral-7b"), "intermediate_size": 11008}, 4, 4, "gptq", "down_proj shards of 2752"),
        # DeepSeek-Coder-33B AWQ at tp 4: 19200 / 4 = 4800 inputs, not a multiple of the group size 128
        (Layout(4), alias("deepseek-coder-33b"), 4, 4, "awq", "down_proj shards of 4800"),
    ],
)
def test_misfits_are_refused_with_one_sentence(layout, config, gpus, cores, method, says):
    with pytest.raises(ConfigError, match=says) as refused:
        check(layout, config, gpus=gpus, cpu_cores=cores, method=method)
    assert "\n" not in str(refused.value)


def test_layouts_that_fit_pass():
    check(Layout(2), alias("mistral-7b"), gpus=2, cpu_cores=1)
    check(Layout(8), alias("mistral-7b"), gpus=8, cpu_cores=1)  # 8 KV heads: one per rank
    check(Layout(2, 2), alias("deepseek-coder-33b"), gpus=4, cpu_cores=1, method="awq")
    check(
        Layout(2), {**alias("mistral-7b"), "num_attention_heads": 4, "num_key_value_heads": 2}, gpus=None, cpu_cores=2
    )


def test_the_demo_model_cannot_split_in_two():
    with pytest.raises(ConfigError, match="not divisible by tensor_parallel_size 2; use one of 1, 3, 9"):
        check(Layout(2), DEMO, gpus=None, cpu_cores=2) if DEMO["num_attention_heads"] == 9 else pytest.skip("demo")


# ---- sizes: vLLM's rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layers", "pp"), [(30, 1), (30, 2), (30, 4), (32, 3), (61, 4), (80, 8), (7, 5)])
def test_pipeline_stages_match_vllms_get_pp_indices(layers, pp):
    from vllm.distributed.utils import get_pp_indices

    expected = [get_pp_indices(layers, rank, pp) for rank in range(pp)]
    parts = pp_partitions(layers, pp)
    starts = [sum(parts[:r]) for r in range(pp)]
    assert [(s, s + n) for s, n in zip(starts, parts, strict=True)] == expected


def test_vocabulary_is_padded_like_vllm_then_split():
    from vllm.model_executor.layers.vocab_parallel_embedding import pad_vocab_size

    config = {**alias("mistral-7b"), "vocab_size": 32001, "tie_word_embeddings": True}
    padded = pad_vocab_size(32001)
    one = rank_bytes(config, Layout(1), bytes_per_weight=0, embed_bytes=1, kv_bytes=2)
    two = rank_bytes(config, Layout(2), bytes_per_weight=0, embed_bytes=1, kv_bytes=2)
    assert one.weights == padded * config["hidden_size"]  # tied: one matrix
    assert two.weights == padded // 2 * config["hidden_size"]


def test_kv_heads_are_split_then_replicated_like_qkv_parallel_linear():
    config = alias("mistral-7b")  # 8 KV heads of 128
    per_token = [
        rank_bytes(config, Layout(tp), bytes_per_weight=0, embed_bytes=0, kv_bytes=2).kv_per_token
        for tp in (1, 2, 8, 16)
    ]
    layer = 32 * 128 * 2 * 2
    assert per_token == [layer * 8, layer * 4, layer * 1, layer * 1]  # at tp 16 each rank still holds one head


def test_one_rank_holds_the_whole_model():
    config = alias("deepseek-coder-33b")
    linear, _ = param_counts(config)
    sizes = rank_bytes(config, Layout(1), bytes_per_weight=2, embed_bytes=2, kv_bytes=2)
    vocab = -(-config["vocab_size"] // 64) * 64
    assert sizes.weights == linear * 2 + vocab * config["hidden_size"] * 2 * 2  # + embedding and LM head


@pytest.mark.parametrize("model", SEEDS)
def test_per_gpu_weights_shrink_with_tp(model):
    spec = load_spec(model)
    whole = weight_bytes(spec)
    for tp in (2, 4):
        assert weight_bytes(spec, Layout(tp)) == pytest.approx(whole / tp, rel=0.01)


# ---- planner rows for the seed models: TP 1/2/4 on 24/48/80 GB cards ---------------------------------------
EXPECTED_FITS = {  # (tp, card GB) -> fits, for 32-33B FP16 at 4,096 tokens with 4 full sequences guaranteed
    (1, 24): False,
    (1, 48): False,
    (1, 80): True,
    (2, 24): False,
    (2, 48): True,
    (2, 80): True,
    (4, 24): True,
    (4, 48): True,
    (4, 80): True,
}


@pytest.mark.parametrize("model", SEEDS)
@pytest.mark.parametrize(("tp", "card_gb"), sorted(EXPECTED_FITS))
def test_seed_models_plan_per_gpu(model, tp, card_gb):
    result = plan([load_spec(model)], card_gb * 1e9 / GIB, max_model_len=4096, max_num_seqs=64, layout=Layout(tp))
    row = result.models[0]
    assert result.fits is EXPECTED_FITS[(tp, card_gb)], (model, tp, card_gb, row)
    assert row.tensor_parallel_size == tp
    if result.fits:
        assert 0 < row.gpu_memory_utilization <= 0.95
        assert row.max_full_seqs >= 4


def test_plan_cli_answers_33b_fp16_on_two_48gb_cards():
    cmd = [sys.executable, "-m", "worker", "plan", "deepseek-coder-33b", "--gpu-mem", "48GB", "--tp", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)["models"][0]
    assert row["tensor_parallel_size"] == 2
    assert row["weights_gib"] == pytest.approx(31, abs=1)
    refused = subprocess.run([*cmd[:-3], "--tp", "3"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert refused.returncode == 2
    assert "not divisible by tensor_parallel_size 3" in refused.stderr


# ---- supervisor: models on GPU groups -----------------------------------------------------------------------
def model_dir(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.mkdir()
    shutil.copy(ROOT / "config" / "models" / f"{name}.json", path / "config.json")
    return str(path)


def test_one_model_on_gpus_0_1_and_another_on_gpu_2(tmp_path):
    big, small = model_dir(tmp_path, "deepseek-coder-33b"), model_dir(tmp_path, "mistral-7b")
    cfg = WorkerConfig.model_validate(
        {
            "models": [
                {
                    "path": big,
                    "projects": ["maze"],
                    "visible_devices": "0,1",
                    "tensor_parallel_size": 2,
                    "max_model_len": 4096,
                },
                {"path": small, "projects": ["driving"], "visible_devices": "2", "max_model_len": 4096},
            ]
        }
    )
    shares = plan_models(cfg, [44.7, 44.7, 44.7])  # three 48 GB cards
    assert all(s is not None and 0 < s <= 0.95 for s in shares)
    with pytest.raises(ConfigError, match="overlap"):
        plan_models(
            cfg.model_copy(
                update={"models": [cfg.models[0], cfg.models[1].model_copy(update={"visible_devices": "1"})]}
            ),
            [44.7] * 3,
        )
    with pytest.raises(ConfigError, match="tp2 needs 2 GPU"):
        plan_models(
            cfg.model_copy(update={"models": [cfg.models[0].model_copy(update={"visible_devices": "0"})]}), [44.7] * 3
        )
    with pytest.raises(ConfigError, match="do not fit"):
        plan_models(cfg, [22.3, 22.3, 22.3])  # 24 GB cards


def test_cpu_ranks_get_disjoint_cores():
    assert cpu_binding(Layout(2), [0, 1]) == "0|1"
    assert cpu_binding(Layout(2), list(range(8))) == "0,1,2,3|4,5,6,7"
    assert cpu_binding(Layout(2, 2), list(range(8))) == "0,1|2,3|4,5|6,7"


def test_lora_slots_count_against_the_budget():
    spec = load_spec("mistral-7b")
    plain = plan([spec], 24, max_model_len=4096, max_num_seqs=64)
    with_lora = plan([spec], 24, max_model_len=4096, max_num_seqs=64, lora=(4, 64))
    row = with_lora.models[0]
    # Mistral-7B: 32 layers x rank 64 x sum(in + out) over q, k, v, o, gate, up, down, 2 bytes, 4 slots
    per_layer = 64 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 2 + (14336 + 4096))
    assert row.lora_gib == pytest.approx(4 * 32 * per_layer * 2 / GIB, rel=1e-3)
    assert row.weights_gib == pytest.approx(plain.models[0].weights_gib + row.lora_gib, abs=0.02)
    assert row.max_full_seqs <= plain.models[0].max_full_seqs
