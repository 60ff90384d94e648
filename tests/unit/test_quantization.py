"""Quantization pre-flight: one row per rule, against the installed vLLM's own method list."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT

from worker.config import ModelConfig
from worker.engine.quantization import Device, VllmSupport, check_context, plan
from worker.errors import ConfigError

CPU = Device("cpu")
AMPERE = Device("cuda", 80, "A100")
ADA = Device("cuda", 89, "L40S")
TURING = Device("cuda", 75, "T4")
VOLTA = Device("cuda", 70, "V100")
DENSE: dict = {"max_position_embeddings": 8192}
AWQ_CKPT = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64}}
AWQ_G96 = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 96}}
GPTQ_CKPT = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
CT_CKPT = {"quantization_config": {"quant_method": "compressed-tensors"}}
BNB_CKPT = {"quantization_config": {"quant_method": "bitsandbytes"}}


@pytest.fixture(scope="module")
def support() -> VllmSupport:
    """The real installed vLLM's methods and capabilities (imports vllm once)."""
    from worker.engine.vllm_preflight import vllm_support

    return vllm_support()


def cfg(**kw) -> ModelConfig:
    return ModelConfig(path="models/x", **kw)


OK_ROWS = [
    # (requested, checkpoint, device, expected engine arg, kernel contains)
    ("auto", DENSE, CPU, None, "dense"),
    ("none", DENSE, CPU, None, "dense"),
    ("auto", AWQ_CKPT, CPU, None, "CPUWNA16"),
    ("awq", AWQ_CKPT, CPU, None, "CPUWNA16"),
    ("auto", AWQ_CKPT, AMPERE, "awq_marlin", "Marlin"),
    ("awq", AWQ_CKPT, AMPERE, "awq_marlin", "Marlin"),
    ("awq", AWQ_CKPT, TURING, "awq_marlin", "Marlin"),
    ("awq", AWQ_G96, AMPERE, "awq", "plain kernel"),
    ("auto", GPTQ_CKPT, AMPERE, "gptq_marlin", "Marlin"),
    ("gptq", GPTQ_CKPT, VOLTA, "gptq", "plain kernel"),
    ("auto", CT_CKPT, CPU, None, "compressed-tensors"),
    ("fp8", DENSE, ADA, "fp8", "native FP8"),
    ("fp8", DENSE, AMPERE, "fp8", "Marlin"),
]


@pytest.mark.parametrize(("requested", "ckpt", "device", "arg", "kernel"), OK_ROWS)
def test_accepted_rows(support, requested, ckpt, device, arg, kernel):
    result = plan(cfg(quantization=requested), ckpt, device, support)
    assert result.engine_arg == arg
    assert kernel in result.kernel


def test_bitsandbytes_with_the_plugin_quantizes_on_the_fly(support):
    with_plugin = VllmSupport(support.methods, support.min_capability, support.marlin_group_sizes, bnb_plugin=True)
    result = plan(cfg(quantization="bitsandbytes"), DENSE, CPU, with_plugin)
    assert result.engine_arg == "bitsandbytes"
    assert "on the fly" in result.kernel
    assert plan(cfg(quantization="auto"), BNB_CKPT, CPU, with_plugin).engine_arg == "bitsandbytes"


ERROR_ROWS = [
    # (requested, checkpoint, device, kv dtype, words the message must contain)
    ("awq", DENSE, CPU, "auto", ["not pre-quantized", "bitsandbytes", "AWQ"]),
    ("gptq", DENSE, AMPERE, "auto", ["not pre-quantized"]),
    ("compressed-tensors", DENSE, CPU, "auto", ["not pre-quantized"]),
    ("gptq", AWQ_CKPT, CPU, "auto", ["quantized with awq"]),
    ("none", AWQ_CKPT, CPU, "auto", ["pre-quantized with awq", "auto"]),
    ("bitsandbytes", AWQ_CKPT, CPU, "auto", ["already quantized with awq"]),
    ("fp8", DENSE, CPU, "auto", ["needs a GPU", "kv-cache-dtype fp8"]),
    ("fp8", DENSE, Device("cuda", 61, "P100"), "auto", ["compute capability >= 7.5"]),
    ("awq", AWQ_CKPT, Device("cuda", 61, "P100"), "auto", ["compute capability"]),
    ("squeezellm", DENSE, CPU, "auto", ["removed"]),
    ("gguf", DENSE, CPU, "auto", ["GGUF"]),
    ("magic4bit", DENSE, CPU, "auto", ["unknown quantization method", "awq"]),
    ("auto", DENSE, CPU, "fp3", ["kv_cache_dtype"]),
]


@pytest.mark.parametrize(("requested", "ckpt", "device", "kv", "words"), ERROR_ROWS)
def test_refused_rows_say_what_to_do(support, requested, ckpt, device, kv, words):
    with pytest.raises(ConfigError) as info:
        plan(cfg(quantization=requested, kv_cache_dtype=kv), ckpt, device, support)
    for word in words:
        assert word in str(info.value)


def test_bitsandbytes_without_the_plugin_names_the_install_command(support):
    without = VllmSupport(support.methods, support.min_capability, support.marlin_group_sizes, bnb_plugin=False)
    with pytest.raises(ConfigError, match="pip install --no-deps vllm-bnb-plugin"):
        plan(cfg(quantization="bitsandbytes"), DENSE, CPU, without)


def test_method_list_comes_from_vllm(support):
    assert "awq" in support.methods
    # out of tree in 0.32: only the plugin brings it back (loaded when an engine started in this process)
    assert ("bitsandbytes" in support.methods) == ("vllm_bnb_plugin" in sys.modules)
    assert "squeezellm" not in support.methods


def test_kv_cache_fp8_is_accepted_on_cpu(support):
    assert plan(cfg(kv_cache_dtype="fp8"), DENSE, CPU, support).engine_arg is None


@pytest.mark.parametrize(
    ("length", "config", "ok"),
    [
        (8192, {"max_position_embeddings": 8192}, True),
        (8193, {"max_position_embeddings": 8192}, False),
        (32768, {"max_position_embeddings": 8192, "rope_scaling": {"factor": 4.0}}, True),
    ],
)
def test_max_model_len_against_the_model(length, config, ok):
    if ok:
        check_context(ModelConfig(max_model_len=length), config)
    else:
        with pytest.raises(ConfigError, match="max-model-len 8192"):
            check_context(ModelConfig(max_model_len=length), config)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantization", "awq"], "not pre-quantized"),
        (["--quantization", "squeezellm"], "removed"),
        (["--max-model-len", "100000"], "above the model's limit"),
        (["--model", "/nonexistent/model"], "no config.json"),
    ],
)
def test_cli_refuses_before_loading_with_exit_code_2(flags, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--projects", "maze", "--port", "0", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "engine starting" not in proc.stderr
