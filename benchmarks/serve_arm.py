"""Arm (e) serve: vLLM's own OpenAI server, what a user would run instead of the worker (issue 16).

`python -m vllm.entrypoints.openai.api_server` from the same venv (the `vllm serve` console script
fails on the CPU wheel: it looks up the distribution `vllm`), same model and engine settings as the
worker arms (max_model_len, max_num_seqs, eager, prefix caching, the same VLLM_CPU_KVCACHE_SPACE),
streaming chat completions at the same concurrency, `ignore_eos` so every answer has max_tokens tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp


async def run_serve_level(
    port: int, level: dict[str, int], convo: list[list[dict[str, str]]], max_tokens: int
) -> tuple[float, list[dict[str, float]], int]:
    """(wall seconds, per-request samples, errors) for one concurrency level."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await _one(http, url, [{"role": "user", "content": "warm up"}], 4)  # untimed, as in every arm
        sem = asyncio.Semaphore(level["concurrency"])
        samples: list[dict[str, float]] = []
        errors = 0

        async def run(i: int) -> None:
            nonlocal errors
            async with sem:
                sample = await _one(http, url, convo[i % len(convo)], max_tokens)
                if sample is None:
                    errors += 1
                else:
                    samples.append(sample)

        started = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(level["requests"])))
        return time.perf_counter() - started, samples, errors


async def _one(http: aiohttp.ClientSession, url: str, chat: list[dict[str, str]], max_tokens: int) -> Any:
    body = {
        "model": "bench",
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            return None
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    end = time.perf_counter()
    return {"ttft_s": (first or end) - started, "e2e_s": end - started, "tokens": tokens}


def serve_command(model: str, port: int) -> list[str]:
    """The API server with the worker arms' engine settings."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--max-num-seqs", "64", "--enforce-eager", "--enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip


def serve_env(kv_space_gib: int, *, model_in_engine_core: bool = False) -> dict[str, str]:
    """The same KV-cache size as the worker arms, quiet logs, and the engine layout.

    vLLM's own layout (multiprocessing 1) runs the model in a worker process of its own; the `serve-mp0`
    arm runs it inside the engine core (0), the layout the worker uses on CPU hosts and the fastest on
    2 cores, so that the worker is compared with the API server at its best too (issue 30).
    """
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if model_in_engine_core:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env
