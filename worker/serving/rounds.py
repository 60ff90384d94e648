"""Device-tool rounds: the model calls a project's device tools, the worker runs them, the model goes on.

After a generation whose calls all name device tools, the calls run at once (each within its tool's
timeout), their results are appended to the chat as tool turns, and the model generates again, up to
the project's `max_tool_rounds` (then the request ends with finish reason `tool_rounds`). A call that
cannot run (unknown tool, bad arguments), a timeout or a device error becomes a result the model reads,
never a hang. While a request awaits a device it holds no engine slot: the engine batches the others.
A round that also calls a client tool goes back to the client (section 3a of docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from worker.engine.base import Prompt
from worker.errors import BadRequestError
from worker.protocol import ChatMessage, Request
from worker.protocol.tools import ToolCall, ToolSet
from worker.serving.devices import DeviceTool, DeviceTools, Result
from worker.serving.replies import Outcome

Generate = Callable[[Prompt, int], Awaitable[Outcome]]
"""Generate from a prompt in a given round (call ids derive from it)."""
Render = Callable[[Sequence[ChatMessage]], Awaitable[Prompt]]
TRACE_RESULT_CHARS = 1024
"""What the trace keeps of each result (the model got all of it): 16 rounds x 16 calls stay far below the
broker's packet limit, where whole 16 KiB results would not."""
Event = Callable[[dict[str, Any]], Awaitable[None]]
"""Show one step to a streaming client (`toolCall`, `toolResult`)."""


def with_device_tools(request: Request, devices: DeviceTools | None) -> Request:
    """The request offering its project's device tools too (a client tool of the same name wins).

    Raises `BadRequestError` when its `toolChoice` forces a call no offered tool can answer.
    """
    tools = devices.tools(request.route.project) if devices is not None else ()
    client = request.tools
    if not tools and client is None:
        return request
    names = {s.name for s in client.specs} if client is not None else set()
    specs = (client.specs if client is not None else ()) + tuple(t.spec for t in tools if t.spec.name not in names)
    merged = ToolSet(specs, client.choice, client.named) if client is not None else ToolSet(specs)
    if merged.named is not None and merged.spec(merged.named) is None:
        raise BadRequestError(f"toolChoice names {merged.named[:64]!r}, which is not among the tools offered")
    if merged.choice == "required" and not specs:
        raise BadRequestError("toolChoice required needs tools")
    return dataclasses.replace(request, tools=merged)


async def run_rounds(
    request: Request,
    prompt: Prompt,
    first: Outcome,
    *,
    devices: DeviceTools,
    generate: Generate,
    render: Render,
    event: Event,
) -> Outcome:
    """Run device-tool rounds from `first` until the model answers, calls a client tool, or runs out."""
    project = request.route.project
    available = {t.spec.name: t for t in devices.tools(project)}
    client = {s.name for s in request.tools.specs} - set(available) if request.tools is not None else set()
    outcome, chat, trace, total = first, list(prompt.messages), [], [first]
    for round_no in range(1, request.project.max_tool_rounds + 1):
        calls = outcome.tool_calls
        if not calls or any(c.name in client for c in calls):  # a client tool: the client runs this round
            break
        for call in calls:
            await event({"event": "toolCall", "toolCall": call.wire()})
        results = await asyncio.gather(*(_run(devices, project, c, available.get(c.name), request) for c in calls))
        steps = [_step(call, result) for call, result in zip(calls, results, strict=True)]
        for step in steps:
            await event({"event": "toolResult", "toolResult": step})
        trace.append({"round": round_no, "calls": steps, "usage": _usage(outcome)})
        chat += [
            ChatMessage("assistant", outcome.text, tool_calls=calls),
            *(ChatMessage("tool", r.content, tool_call_id=c.id) for c, r in zip(calls, results, strict=True)),
        ]
        outcome = await generate(await render(chat), round_no)
        total.append(outcome)
    else:
        if outcome.tool_calls and not any(c.name in client for c in outcome.tool_calls):
            outcome = dataclasses.replace(outcome, finish_reason="tool_rounds", tool_calls=())
    return _summed(outcome, total, tuple(trace))


async def _run(devices: DeviceTools, project: str, call: ToolCall, tool: DeviceTool | None, request: Request) -> Result:
    if call.error is not None or tool is None:  # unknown tool or bad arguments: the model reads why, nothing is sent
        return Result(f"error: {call.error or 'unknown tool'}", "invalid", 0)
    return await devices.call(project, call, tool, request.request_id)


def _step(call: ToolCall, result: Result) -> dict[str, Any]:
    """One call in the trace (and its `toolResult` event): the result cut at TRACE_RESULT_CHARS."""
    step: dict[str, Any] = {"id": call.id, "name": call.name, "result": result.content[:TRACE_RESULT_CHARS]}
    if len(result.content) > TRACE_RESULT_CHARS:
        step["resultChars"] = len(result.content)
    step["ms"] = result.ms
    if result.error:
        step["error"] = result.error
    return step


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "promptTokens": outcome.prompt_tokens,
        "completionTokens": outcome.completion_tokens,
        "cachedTokens": outcome.cached_tokens,
    }


def _summed(last: Outcome, rounds: list[Outcome], trace: tuple[dict[str, Any], ...]) -> Outcome:
    """The last outcome with every round's tokens added up (`usage` sums the rounds; the trace has each)."""
    if len(rounds) == 1:
        return last
    return dataclasses.replace(
        last,
        prompt_tokens=sum(o.prompt_tokens for o in rounds),
        completion_tokens=sum(o.completion_tokens for o in rounds),
        cached_tokens=sum(o.cached_tokens for o in rounds),
        queue_ms=rounds[0].queue_ms,
        ttft_ms=rounds[0].ttft_ms,
        trace=trace,
    )
