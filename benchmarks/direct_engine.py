"""Arm (a): the bare in-process AsyncLLM, no MQTT: the ceiling the worker is measured against.

Runs the same prompts, concurrency levels and sampling as the MQTT arms and prints one JSON line of
per-request samples per level. Started by benchmarks/bench.py in its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import delta, front_and_engine, group_cpu_s

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


async def one(llm, tok, chat, max_tokens, request_id):
    from vllm.inputs import TokensPrompt  # noqa: PLC0415
    from vllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: PLC0415

    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    first = None
    tokens = 0
    async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
        n = len(out.outputs[0].token_ids)
        if n and first is None:
            first = time.perf_counter()
        tokens += n
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "e2e_s": end - start, "tokens": tokens}


async def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=spec["model"],
            enforce_eager=True,
            max_model_len=2048,
            max_num_seqs=64,
            quantization=spec.get("quantization"),
        )
    )
    print(json.dumps({"quantization": str(llm.model_config.quantization or "none")}), flush=True)
    tok = llm.get_tokenizer()
    await one(llm, tok, [{"role": "user", "content": "warm up"}], 4, "warmup")  # untimed, as in every arm
    print(json.dumps({"ready": True}), flush=True)
    n = 0
    for level in spec["levels"]:
        chats = spec["chats"]
        samples: list[dict] = []
        sem = asyncio.Semaphore(level["concurrency"])

        async def run(i: int) -> None:
            nonlocal n
            async with sem:
                n += 1
                samples.append(await one(llm, tok, chats[i % len(chats)], spec["max_tokens"], f"d{n}"))

        groups = front_and_engine(os.getpid())  # this process (load + AsyncLLM front) and the engine core
        started, cpu = time.perf_counter(), group_cpu_s(groups)
        await asyncio.gather(*(run(i) for i in range(level["requests"])))
        wall = time.perf_counter() - started
        cpu_s = delta(cpu, group_cpu_s(groups))
        print(json.dumps({"level": level, "wall_s": wall, "samples": samples, "cpu_s": cpu_s}), flush=True)
    llm.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
