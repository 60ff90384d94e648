"""`model.dtype = "auto"` on a CPU: float32 without bf16 instructions (when it fits), bfloat16 with them.

Both branches run on every machine: the CPU flags are injected (a machine has one or the other)."""

from worker.config import ModelConfig
from worker.engine import plan as planner
from worker.engine.cpu_dtype import choose, cpu_flags
from worker.engine.vllm_preflight import cpu_dtype

DEMO = {  # the demo model's shape (SmolLM2-135M)
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
NO_BF16 = frozenset({"avx2", "avx512f", "avx512bw"})
BF16 = NO_BF16 | {"avx512_bf16"}
AMX = NO_BF16 | {"amx_bf16", "amx_tile"}


def test_a_cpu_without_bf16_instructions_runs_float32_when_it_fits():
    choice = choose("auto", DEMO, flags=NO_BF16, ram_gib=24, kv_gib=1)
    assert choice.dtype == "float32"
    assert "no bf16 instructions" in choice.reason


def test_a_cpu_with_bf16_instructions_keeps_bfloat16():
    assert choose("auto", DEMO, flags=BF16, ram_gib=24, kv_gib=1).dtype == "bfloat16"
    assert "amx_bf16" in choose("auto", DEMO, flags=AMX, ram_gib=24, kv_gib=1).reason


def test_float32_that_would_not_fit_in_ram_stays_bfloat16():
    big = DEMO | {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "intermediate_size": 28672}
    choice = choose("auto", big, flags=NO_BF16, ram_gib=24, kv_gib=1)
    assert choice.dtype == "bfloat16"
    assert "would not fit" in choice.reason


def test_a_configured_dtype_is_kept_and_a_quantized_model_keeps_vllms_choice():
    assert choose("float16", DEMO, flags=NO_BF16, ram_gib=24, kv_gib=1).dtype == "float16"
    quantized = DEMO | {"quantization_config": {"quant_method": "awq"}}
    assert cpu_dtype(ModelConfig(), quantized, 24).dtype == "auto"


def test_the_flags_are_read_from_cpuinfo_and_an_unreadable_one_means_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_cpu_kv_cache_is_sized_in_the_dtype_chosen():
    sizes = {kv: planner.kv_bytes_per_token(DEMO, kv) for kv in ("auto", "float32")}
    assert sizes["float32"] == 2 * sizes["auto"]
