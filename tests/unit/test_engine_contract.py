"""The engine contract (DESIGN section 7): one suite, run against the fake and the real vLLM engine, so
the fake the other tests rely on cannot drift from the adapter users run. The vLLM half loads the demo
model in this process once (marker e2e)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from support import MODEL_DIR

from worker.config import ModelConfig
from worker.engine.base import Delta, Engine
from worker.engine.fake import FakeEngine
from worker.errors import BadRequestError
from worker.protocol import ChatMessage, Sampling

pytestmark = pytest.mark.asyncio(loop_scope="module")  # AsyncLLM binds its output task to one event loop

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=24)


def fake_script(_prompt: object) -> str:
    return "The robot should turn left because the wall ahead blocks the way and left is open wide"


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["fake", pytest.param("vllm", marks=pytest.mark.e2e)]
)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "fake":
        async with FakeEngine(script=fake_script, max_model_len=2048) as fake:
            yield fake
        return
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"demo model missing at {MODEL_DIR}: run `make model` (make test does it)")
    from worker.engine.vllm import VllmEngine

    cfg = ModelConfig(path=str(MODEL_DIR), max_model_len=512, max_num_seqs=8, cpu_kvcache_space_gib=1)
    async with VllmEngine(cfg, MODEL_DIR) as real:
        yield real


async def collect(engine: Engine, sampling: Sampling = GREEDY, text: str = "Which way out of the maze?") -> list[Delta]:
    prompt = await engine.render([ChatMessage("user", text)])
    return [d async for d in engine.generate(prompt, sampling, f"contract-{id(sampling)}-{len(text)}")]


async def until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls an engine counter, no event exists for it
            await asyncio.sleep(0.01)


async def test_deltas_add_up_and_only_the_last_one_finishes(engine: Engine) -> None:
    deltas = await collect(engine)
    assert deltas
    assert [d.finish_reason is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(d.text for d in deltas).strip()
    assert sum(d.new_tokens for d in deltas) <= GREEDY.max_tokens
    assert all(d.prompt_tokens > 0 for d in deltas)


async def test_max_tokens_caps_the_answer_with_finish_reason_length(engine: Engine) -> None:
    deltas = await collect(engine, Sampling(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=3, ignore_eos=True))
    assert sum(d.new_tokens for d in deltas) == 3
    assert deltas[-1].finish_reason == "length"


async def test_greedy_is_deterministic_and_a_stop_string_ends_the_answer_before_it(engine: Engine) -> None:
    first = "".join(d.text for d in await collect(engine))
    second = "".join(d.text for d in await collect(engine))
    assert first == second
    words = first.split()
    assert len(words) > 4, first
    stop = words[3]
    stopped = await collect(engine, Sampling(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=24, stop=(stop,)))
    assert "".join(d.text for d in stopped) == first[: first.find(stop)]
    assert stopped[-1].finish_reason == "stop"


async def test_cancelling_the_consumer_aborts_and_frees_the_request(engine: Engine) -> None:
    prompt = await engine.render([ChatMessage("user", "Tell a long story.")])
    sampling = Sampling(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=400, ignore_eos=True)
    if isinstance(engine, FakeEngine):
        engine = FakeEngine(script=lambda _p: "word " * 400, token_delay_s=0.01)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(prompt, sampling, "contract-abort"):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    assert engine.inflight() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: engine.inflight() == 0)
    assert (await collect(engine))[-1].finish_reason is not None  # and the engine still serves


async def test_render_and_count_tokens_agree(engine: Engine) -> None:
    text = "Wall ahead, opening on the left."
    count = await engine.count_tokens(text)
    prompt = await engine.render([ChatMessage("system", "Be brief."), ChatMessage("user", text)])
    assert await engine.count_tokens("") == 0
    assert await engine.count_tokens(text, text) == 2 * count  # several texts: the sum, in one call
    assert 0 < count < len(prompt.token_ids)  # the template adds tokens around the text
    assert prompt == await engine.render([ChatMessage("system", "Be brief."), ChatMessage("user", text)])
    assert text in prompt.text


async def test_a_prompt_that_fills_the_context_is_a_bad_request(engine: Engine) -> None:
    words = " ".join(["maze"] * (engine.max_model_len + 10))
    with pytest.raises(BadRequestError):
        await collect(engine, text=words)
