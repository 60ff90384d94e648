"""One generation of a request: the engine's deltas to an `Outcome` (text, reasoning, tool calls, usage).

Text streams as it comes, unless tools are offered: a call's markup is never shown, so the output is
held and the model's parsers split it at the end. The model's parsers (vLLM's, for the real engine)
split off reasoning and calls; without them the `<think>` filter does (`protocol.visible_text`).
"""

from __future__ import annotations

import dataclasses
import time

import structlog

from worker.engine.adapters import Adapter
from worker.engine.base import Parsed, Prompt
from worker.protocol import Dialect, Request, visible_text
from worker.protocol.tools import MAX_TOOL_CALLS, ToolCall, call_id, check_arguments
from worker.serving.pipeline import Pipeline
from worker.serving.replies import Outcome, Stream

log = structlog.get_logger(__name__)


async def generate(p: Pipeline, request: Request, prompt: Prompt, stream: Stream, round_no: int = 0) -> Outcome:
    """Run the engine; with tools, the output is held back and split by the model's parser at the end."""
    tokens = cached = 0
    finish = "stop"
    started = time.monotonic()
    first_token_at: float | None = None
    sampling = dataclasses.replace(request.sampling, ignore_eos=True) if p.ignore_eos else request.sampling
    priority = request.priority if p.priority_scheduling else 0
    adapter = p.adapters.acquire(request.route.project)
    tools = request.tools if request.uses_tools else None
    held: list[str] = []
    parsed: Parsed | None = None
    reached = False  # the engine answered: the prompt was prefilled and counts (`accounting`)
    try:
        deltas = p.engine.generate(prompt, sampling, request.request_id, priority, adapter, tools=tools)
        async for delta in deltas:
            reached = True
            if first_token_at is None and delta.new_tokens:
                first_token_at = time.monotonic()
            tokens += delta.new_tokens
            stream.spent.completion_tokens += delta.new_tokens
            cached = max(cached, delta.cached_tokens)
            finish = delta.finish_reason or finish
            parsed = delta.parsed or parsed
            if tools is None:
                await stream.feed(delta.text, delta.new_tokens)
            else:  # a call's markup is never shown: the parser splits the whole output at the end
                held.append(delta.text)
    finally:
        if reached:
            stream.spent.generation(len(prompt.token_ids), cached)
        if (retired := p.adapters.release(adapter)) is not None:  # replaced, and this was its last request
            await _unload(p, retired)
    now = time.monotonic()
    text, reasoning = _split(request, stream.raw_text if tools is None else "".join(held), parsed)
    calls = _tool_calls(p, request, parsed, round_no)
    return Outcome(
        text=text,
        reasoning=reasoning,
        finish_reason="tool_calls" if calls and finish == "stop" else finish,
        prompt_tokens=len(prompt.token_ids),
        completion_tokens=tokens,
        cached_tokens=cached,
        queue_ms=round((started - request.received_at) * 1000),
        ttft_ms=round(((first_token_at or now) - request.received_at) * 1000),
        total_ms=round((now - request.received_at) * 1000),
        tool_calls=calls,
    )


def _split(request: Request, raw: str, parsed: Parsed | None) -> tuple[str, str | None]:
    """The reply's text and its reasoning: split by the model's parsers where they ran, else by the filter.

    A v2 reply of a project that keeps reasoning carries it apart (`reasoning`); a classic one keeps it
    inline as it always did; a project that strips it never sends it.
    """
    if parsed is None:
        return visible_text(request.project, raw), None
    content = visible_text(request.project, parsed.content)
    if request.project.strip_reasoning or parsed.reasoning is None:
        return content, None
    if request.route.dialect is Dialect.CLASSIC:
        return f"<think>{parsed.reasoning}</think>{content}", None
    return content, parsed.reasoning.strip()


def _tool_calls(p: Pipeline, request: Request, parsed: Parsed | None, round_no: int = 0) -> tuple[ToolCall, ...]:
    """The parsed calls with their ids (from requestId, round, index) and, where one cannot run, why."""
    if parsed is None or request.tools is None:
        return ()
    calls = tuple(
        ToolCall(
            call_id(request.request_id, round_no, i),
            c.name,
            c.arguments,
            check_arguments(request.tools.spec(c.name), c.name, c.arguments),
        )
        for i, c in enumerate(parsed.calls[:MAX_TOOL_CALLS])
    )
    project = request.route.project
    p.counters[(project, "tool_calls")] += len(calls)
    p.counters[(project, "tool_calls_invalid")] += sum(c.error is not None for c in calls)
    return calls


async def _unload(p: Pipeline, adapter: Adapter) -> None:
    """Drop a retired adapter; a failure costs a log line, never the answer that just finished."""
    try:
        await p.engine.unload_adapter(adapter)
    except Exception:
        log.exception("adapter.unload_failed", adapter=adapter.name)
