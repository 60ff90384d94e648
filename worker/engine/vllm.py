"""`VllmEngine`: the in-process vLLM `AsyncLLM` behind the `Engine` protocol. The only importer of vllm.

AsyncLLM batches every request submitted to it continuously, so the service simply runs one task per
request. Start-up is run in a thread (it blocks for ~13 s on CPU) so the event loop keeps serving MQTT.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from worker.config import ModelConfig
from worker.engine import parallel
from worker.engine.adapters import Adapter
from worker.engine.base import Delta, EngineStats, Prompt
from worker.engine.chat_templates import tool_format
from worker.engine.cpu_dtype import DtypeChoice
from worker.engine.quantization import QuantPlan
from worker.engine.stats import StatsAggregator
from worker.engine.vllm_parsing import OutputParsing, Prepared
from worker.engine.vllm_preflight import gpu_present, layout_of, preflight
from worker.errors import BadRequestError, EngineDeadError, EngineError, OverloadedError
from worker.protocol.messages import ChatMessage, Sampling
from worker.protocol.tools import ToolSet

log = structlog.get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 8.0


class VllmEngine:
    """The real engine; see the module docstring."""

    def __init__(self, cfg: ModelConfig, model_dir: Path, *, lora: bool = False) -> None:
        """`lora`: start with LoRA support (a served project names an adapter; `enable_lora` overrides)."""
        self._cfg = cfg
        self._model_dir = model_dir
        self._lora = cfg.enable_lora if cfg.enable_lora is not None else lora
        self._llm: Any = None
        self._tokenizer: Any = None
        # HF fast tokenizers are not safe to call from several threads at once: one dedicated thread.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._quantization = "none"
        self._max_model_len = cfg.max_model_len
        self._stats = StatsAggregator()
        self._plan: QuantPlan | None = None
        self._template: str | None = None
        self._dtype: DtypeChoice | None = None
        self._parsing: OutputParsing | None = None
        self.start_s = 0.0

    @property
    def model_name(self) -> str:
        """Configured name, else the model directory's name."""
        return self._cfg.name or self._model_dir.name

    @property
    def max_model_len(self) -> int:
        """Context window the engine was started with."""
        return self._max_model_len

    @property
    def quantization(self) -> str:
        """The method vLLM resolved (e.g. `awq_marlin`), or "none"."""
        return self._quantization

    def preflight(self) -> QuantPlan:
        """Validate model dir, context length and quantization before anything loads (ConfigError if not)."""
        if self._plan is None:
            checked = preflight(self._cfg, self._model_dir, self.model_name)
            self._plan, self._dtype = checked.plan, checked.dtype
        return self._plan

    @property
    def dtype(self) -> str:
        """The dtype the engine runs (`auto` resolved on CPU; vLLM's own on GPU) and why, for status."""
        return self._dtype.dtype if self._dtype is not None else self._cfg.dtype

    @property
    def dtype_reason(self) -> str:
        """Why this dtype (said at start-up and in status)."""
        return self._dtype.reason if self._dtype is not None else "not checked yet"

    @property
    def layout(self) -> parallel.Layout:
        """How the model is split across GPUs (or CPU ranks)."""
        return layout_of(self._cfg)

    def _engine_args(self, *, on_cpu: bool) -> Any:  # noqa: ANN401 - vllm's AsyncEngineArgs, imported late
        from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415 - import after env is set

        cfg = self._cfg
        quantization = self.preflight().engine_arg
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu
        layout = self.layout
        split: dict[str, Any] = {}
        if self._lora:  # LoRA on CPU runs eager (vLLM's Punica CPU wrapper)
            split |= {"enable_lora": True, "max_loras": cfg.max_loras, "max_lora_rank": cfg.max_lora_rank}
            split |= {"max_cpu_loras": cfg.max_cpu_loras} if cfg.max_cpu_loras else {}
        if layout.world > 1 or layout.backend == "ray":  # one local rank: vLLM's own choice (in-process)
            split |= {
                "tensor_parallel_size": layout.tp,
                "pipeline_parallel_size": layout.pp,
                "distributed_executor_backend": layout.backend,
            }
        return AsyncEngineArgs(
            model=str(self._model_dir),
            served_model_name=self.model_name,
            dtype=self.dtype,  # type: ignore[arg-type]  # validated by vLLM itself
            quantization=quantization,
            kv_cache_dtype=cfg.kv_cache_dtype,  # type: ignore[arg-type]  # same
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            block_size=cfg.block_size,  # None: the platform default
            scheduling_policy=cfg.scheduling_policy,
            use_tqdm_on_load=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in {"DEBUG", "INFO"},
            **split,
        )

    def _start(self) -> None:
        on_cpu = not gpu_present()
        self.preflight()
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415 - heavy, env must be set first

        started = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(
            self._engine_args(on_cpu=on_cpu), stat_loggers=[_stat_logger_class(self._stats)]
        )
        self.start_s = time.perf_counter() - started
        model_config = self._llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._quantization = str(model_config.quantization or "none")
        self._tokenizer = self._llm.get_tokenizer()
        own = getattr(self._tokenizer, "chat_template", None)
        fmt = tool_format(own if isinstance(own, str) else None, self._cfg.chat_template, self._cfg.tool_call_parser)
        self._template = fmt.template
        reasoning = self._cfg.reasoning_parser
        self._parsing = OutputParsing(self._tokenizer, fmt.parser, reasoning) if fmt.parser or reasoning else None
        template = "configured" if fmt.template else "the model's own"
        log.info("engine.parsers", tool_call_parser=fmt.parser, reasoning_parser=reasoning, template=template)

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._start)
        log.info(
            "engine.started",
            model=self.model_name,
            quantization=self._quantization,
            max_model_len=self._max_model_len,
            start_s=round(self.start_s, 1),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        llm, self._llm = self._llm, None
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
        if llm is not None:
            # shutdown() is synchronous (SIGTERM to EngineCore, join): keep it off the loop.
            await asyncio.to_thread(llm.shutdown, SHUTDOWN_TIMEOUT_S)
            log.info("engine.stopped")

    def _render_sync(self, messages: Sequence[ChatMessage], tools: ToolSet | None) -> Prompt:
        chat = [_chat_entry(m) for m in messages]
        offered = [spec.openai() for spec in tools.specs] if tools is not None and tools.active else None
        text = self._tokenizer.apply_chat_template(
            chat, tools=offered, chat_template=self._template, tokenize=False, add_generation_prompt=True
        )
        # The template already holds any BOS the model wants.
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return Prompt(tuple(messages), str(text), tuple(int(i) for i in ids))

    async def render(self, messages: Sequence[ChatMessage], tools: ToolSet | None = None) -> Prompt:
        """Chat template (with the tools offered) + tokenization on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, self._render_sync, messages, tools)

    async def count_tokens(self, *texts: str) -> int:
        """Token count of plain texts (no template), on the tokenizer thread in one hop.

        A wake-up of the tokenizer thread per text cost each recorded turn two hand-overs of the GIL.
        """

        def count() -> int:
            return sum(len(self._tokenizer.encode(text, add_special_tokens=False)) for text in texts if text)

        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, count)

    async def load_adapter(self, adapter: Adapter) -> None:
        """VLLM's add_lora: loads the weights now, so the first request does not pay for it."""
        if self._llm is None or not self._lora:
            raise EngineError("this engine was started without LoRA (model.enable_lora)")
        try:
            await self._llm.add_lora(_lora_request(adapter))
        except Exception as exc:
            raise EngineError(f"loading adapter {adapter.name} failed: {type(exc).__name__}") from exc

    async def unload_adapter(self, adapter: Adapter) -> None:
        """VLLM's remove_lora (only once no request uses it: see AdapterTable)."""
        if self._llm is not None and self._lora:
            await self._llm.remove_lora(adapter.id)

    async def generate(
        self,
        prompt: Prompt,
        sampling: Sampling,
        request_id: str,
        priority: int = 0,
        adapter: Adapter | None = None,
        *,
        tools: ToolSet | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream DELTA outputs; cancellation propagates into AsyncLLM, which aborts the request.

        With active tools, vLLM's parser for the model constrains the output as the choice demands and
        splits the whole output into content and calls on the last delta (`vllm_parsing`).
        """
        from vllm.exceptions import GracefulHTTPError, VLLMClientError  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415
        from vllm.sampling_params import (  # noqa: PLC0415
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError  # noqa: PLC0415

        if self._llm is None:
            raise EngineDeadError("engine is not running")
        prepared = self._prepare(tools)
        structured = StructuredOutputsParams(json=sampling.json_schema) if sampling.json_schema else None
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=prepared.structured_outputs if prepared is not None else structured,
            skip_special_tokens=prepared.skip_special_tokens if prepared is not None else True,
        )
        try:
            tokens = TokensPrompt(prompt_token_ids=list(prompt.token_ids))
            lora = _lora_request(adapter) if adapter is not None else None
            stream = self._llm.generate(tokens, params, request_id, priority=priority, lora_request=lora)
            whole: list[str] = []
            async for out in stream:
                completion = out.outputs[0]
                parsed = None
                if prepared is not None:
                    whole.append(completion.text)
                    if out.finished and self._parsing is not None:
                        parsed = self._parsing.parse(prepared, "".join(whole))
                yield Delta(
                    text=completion.text,
                    new_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(prompt.token_ids),
                    cached_tokens=int(out.num_cached_tokens or 0),
                    parsed=parsed,
                )
        except VllmDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except GracefulHTTPError as exc:
            raise OverloadedError(str(exc)) from exc
        except VLLMClientError as exc:
            raise BadRequestError(str(exc)) from exc
        except (EngineDeadError, BadRequestError, OverloadedError):
            raise
        except Exception as exc:
            raise EngineError(type(exc).__name__) from exc

    def _prepare(self, tools: ToolSet | None) -> Prepared | None:
        """The parsers' adjusted request (None: nothing to parse); BadRequestError for tools without a parser."""
        active = tools is not None and tools.active
        if active and (self._parsing is None or not self._parsing.tools):
            raise BadRequestError(
                "this worker's model has no tool-call parser: set model.tool_call_parser (and model.chat_template)"
            )
        if self._parsing is None or not (active or self._parsing.reasoning):
            return None
        return self._parsing.prepare(tools)

    async def check_health(self) -> None:
        """AsyncLLM.check_health raises once the engine-core process is gone."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError  # noqa: PLC0415

        if self._llm is None:
            raise EngineDeadError("engine is not running")
        try:
            await self._llm.check_health()
        except VllmDeadError as exc:
            raise EngineDeadError(str(exc)) from exc

    def stats(self) -> EngineStats:
        """Aggregated vLLM stat-logger data (running, waiting, KV usage, rates, TTFT/TPOT p50)."""
        return self._stats.snapshot()

    def inflight(self) -> int:
        """Unfinished requests in AsyncLLM's output processor (an abort removes its request)."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())


def _chat_entry(message: ChatMessage) -> dict[str, Any]:
    """A chat message as chat templates take it (OpenAI's shape, arguments as an object)."""
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        entry["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def _arguments(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _lora_request(adapter: Adapter) -> Any:  # noqa: ANN401 - vllm's LoRARequest
    from vllm.lora.request import LoRARequest  # noqa: PLC0415

    return LoRARequest(adapter.name, adapter.id, adapter.path)


def _stat_logger_class(aggregator: StatsAggregator) -> type:
    """A vLLM stat logger that feeds `aggregator`, in place of vLLM's Prometheus logger.

    vLLM adds a Prometheus logger unless one is given, but nobody scrapes this process (telemetry goes over
    MQTT) and its per-step updates were 8% of the front-end's CPU at concurrency 1: so this one is a
    `PrometheusStatLogger` that registers no metrics. vLLM builds it once for all engines.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger  # noqa: PLC0415

    class _Logger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:  # noqa: ANN401
            del vllm_config  # (no super().__init__: it would register the Prometheus metrics)
            self.engine_indexes = engine_indexes or [0]

        def record(
            self,
            scheduler_stats: Any,  # noqa: ANN401
            iteration_stats: Any,  # noqa: ANN401
            mm_cache_stats: Any = None,  # noqa: ANN401
            engine_idx: int = 0,
        ) -> None:
            del mm_cache_stats, engine_idx
            aggregator.record(scheduler_stats, iteration_stats)

        def _nothing(self, *_args: Any, **_kwargs: Any) -> None:  # noqa: ANN401
            return None

        record_sleep_state = record_admission_rejection = log = log_engine_initialized = _nothing

    return _Logger
