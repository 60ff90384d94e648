"""The VRAM planner against seed 000's figures (weights within 10%) and verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT

from worker.engine.plan import GB, cpu_kv_space_gib, kv_bytes_per_token, load_spec, parse_size, plan, weight_bytes
from worker.errors import ConfigError

# seed 000, section 1: "Model Weights Only" in GB
SEED_WEIGHTS_GB = [
    ("deepseek-coder-33b", 66.0),
    ("deepseek-coder-33b:awq", 18.01),
    ("qwen2.5-coder-32b", 64.5),
    ("qwen2.5-coder-32b:awq", 20.0),
    ("mistral-7b", 13.74),
    ("qwen2.5-7b", 14.0),
    ("qwen2.5-14b", 28.0),
]


@pytest.mark.parametrize(("model", "seed_gb"), SEED_WEIGHTS_GB)
def test_weights_match_seed_within_ten_percent(model, seed_gb):
    estimate = weight_bytes(load_spec(model)) / GB
    assert abs(estimate - seed_gb) / seed_gb <= 0.10, f"{model}: {estimate:.2f} GB vs seed {seed_gb} GB"


def test_kv_bytes_per_token_is_layers_kv_heads_head_dim_two_bytes():
    spec = load_spec("mistral-7b")
    assert kv_bytes_per_token(spec.config, "auto") == 32 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(spec.config, "fp8") == 32 * 8 * 128 * 2 * 1


def test_scenario_a_awq_33b_plus_7b_fits_96gb():
    result = plan(
        [load_spec("deepseek-coder-33b:awq"), load_spec("mistral-7b:awq")],
        parse_size("96GiB"),
        max_model_len=8192,
        max_num_seqs=64,
    )
    assert result.fits
    total_util = sum(m.gpu_memory_utilization for m in result.models)
    assert total_util <= 0.95 + 1e-9
    assert all(m.max_full_seqs >= 4 for m in result.models)
    big = result.models[0]
    assert big.gpu_memory_utilization > result.models[1].gpu_memory_utilization


def test_fp16_33b_plus_7b_does_not_fit_and_advises_quantization():
    result = plan(
        [load_spec("deepseek-coder-33b"), load_spec("mistral-7b")],
        parse_size("96GiB"),
        max_model_len=8192,
        max_num_seqs=64,
    )
    assert not result.fits
    assert any("quantize" in line for line in result.advice)


def test_fp8_kv_doubles_full_sequences():
    specs = [load_spec("deepseek-coder-33b:awq")]
    auto = plan(specs, 48, max_model_len=8192, max_num_seqs=256)
    fp8 = plan(specs, 48, max_model_len=8192, max_num_seqs=256, kv_dtype="fp8")
    assert fp8.models[0].max_full_seqs >= 2 * auto.models[0].max_full_seqs - 1


def test_local_model_dir_with_quantization_config_is_read(tmp_path):
    config = json.loads((ROOT / "config" / "models" / "mistral-7b.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "group_size": 128, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_spec(str(tmp_path))
    assert spec.method == "awq"


@pytest.mark.parametrize(("text", "gib"), [("96GiB", 96.0), ("80GB", 80e9 / 2**30), ("48", 48.0), ("1TiB", 1024.0)])
def test_sizes(text, gib):
    assert parse_size(text) == pytest.approx(gib)


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mistral-7b"):
        load_spec("no-such-model")


def test_cpu_kv_space_is_sized_from_max_num_seqs_and_capped():
    demo = (
        json.loads((ROOT / "models" / "smollm2-135m-instruct" / "config.json").read_text())
        if (ROOT / "models" / "smollm2-135m-instruct" / "config.json").is_file()
        else {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
    )
    small = cpu_kv_space_gib(demo, max_model_len=2048, max_num_seqs=8, kv_dtype="auto", ram_gib=24)
    big = cpu_kv_space_gib(demo, max_model_len=2048, max_num_seqs=256, kv_dtype="auto", ram_gib=24)
    assert small == 1
    assert big > small
    assert cpu_kv_space_gib(demo, max_model_len=8192, max_num_seqs=4096, kv_dtype="auto", ram_gib=24) == 6


def test_cli_plan_json_and_exit_code():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "plan",
            "deepseek-coder-33b:awq",
            "mistral-7b:awq",
            "--gpu-mem",
            "96GiB",
            "--max-model-len",
            "8192",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["fits"] is True
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "plan",
            "deepseek-coder-33b",
            "mistral-7b",
            "--gpu-mem",
            "96GiB",
            "--max-model-len",
            "8192",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "does not fit" in bad.stdout


def test_single_model_that_cannot_fit_its_gpu_share_fails_before_load():
    from worker.engine.plan import check_single

    dense_33b = load_spec("deepseek-coder-33b")
    with pytest.raises(ConfigError, match="Quantize it"):
        check_single(dense_33b, 80.0, 0.5, 8192)
    check_single(load_spec("deepseek-coder-33b:awq"), 80.0, 0.5, 8192)  # 16.8 GiB + 2 + 1.9 < 40
