"""`serve(job)`: the request path, top to bottom, with one error mapping (DESIGN section 1).

claim the requestId -> quotas and rate budgets -> session turn -> prompt (history, template, token
trim) -> engine -> stream chunks -> record the turn -> final reply -> cache it for the requestId -> count
what it spent. The first two, the history and the counts are fleet-wide state (`worker.state`). The
deadline covers the whole path, waiting for the session's turn included. Whatever happens, the job
ends with exactly one final reply, or deliberately none (a classic client's cancel, a job left for
redelivery by the drain, a duplicate whose first copy another worker answered); cancellation is
always re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import structlog

from worker.engine.base import Prompt
from worker.errors import (
    EngineDeadError,
    EngineError,
    ErrorCode,
    ExpiredError,
    PublishError,
    RequestCancelledError,
    ShuttingDownError,
    WorkerError,
)
from worker.protocol import ChatMessage, Dialect, FinalReply, Request
from worker.protocol.tools import ToolSet
from worker.serving.accounting import REFUSALS, usage_of
from worker.serving.generation import generate
from worker.serving.jobs import Job
from worker.serving.pipeline import Pipeline
from worker.serving.replies import Outcome, Stream
from worker.serving.rounds import run_rounds, with_device_tools
from worker.serving.sessions import Recorded
from worker.state import Claim
from worker.state.base import Fence

TRANSIENT = {
    ErrorCode.RATE_LIMITED,
    ErrorCode.OVERLOADED,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.STATE_UNAVAILABLE,
    ErrorCode.ENGINE_ERROR,
    ErrorCode.QUOTA_EXCEEDED,
}
"""Errors a retry with the same requestId may get past: never cached as its final reply."""

log = structlog.get_logger(__name__)
T = TypeVar("T")


async def serve(job: Job, p: Pipeline) -> None:
    """The request path; see the module docstring."""
    request = job.request
    stream = p.replier.stream(request)
    log.debug("request.accepted", project=request.route.project, request_id=request.request_id, text=request.message)
    try:
        outcome = await _answer(job, p, stream)
        if outcome is None:
            return
        await _count(p, request, stream, None)
        _sent(job, p, await _to_the_end(stream.finish(outcome)))  # recorded: only this answer may go out
        log.info(
            "request.done",
            project=request.route.project,
            request_id=request.request_id,
            ttft_ms=outcome.ttft_ms,
            total_ms=outcome.total_ms,
            tokens=outcome.completion_tokens,
        )
    except TimeoutError:
        if not await _silent_copy(job, p, stream):
            await _fail(job, stream, p, ExpiredError(f"deadline of {request.deadline_ms} ms passed"))
    except WorkerError as err:
        await _fail(job, stream, p, err)
    except EngineDeadError:
        p.on_engine_death()
        await _fail(job, stream, p, EngineError("the engine stopped"))
    except asyncio.CancelledError:
        await _stopped(job, p, stream)
        raise
    except Exception:
        p.counters[(request.route.project, "internal_errors")] += 1  # a bug of ours: the battery asserts 0
        log.exception("request.failed", request_id=request.request_id)
        await _fail(job, stream, p, EngineError())
    finally:
        await _settle_claim(job, p)
        if not stream.spent.counted:  # ended without a reply of its own (counts if it generated)
            await _count(p, request, stream, None, replied=False)


async def _answer(job: Job, p: Pipeline, stream: Stream) -> Outcome | None:
    """Claim, budgets, the session's turn, prompt, engine, record; None when another copy answers.

    The deadline covers everything up to the end of generation. Recording does not run under it (nor under
    a cancel): an answer generated is then answered exactly as it was recorded, or failed as certainly not
    recorded, never "failed" while its write may still land.
    """
    request = job.request
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(_remaining_s(request)):
            if not await _claim(job, p, stream):
                return None
            await p.state.take(p.budgets(request), p.quotas(request))
            fence = await stack.enter_async_context(p.sessions.turn(request))
            request = with_device_tools(request, p.devices)
            prepared = await p.sessions.build_prompt(request)
            if isinstance(prepared, Recorded):  # recorded by an earlier copy whose reply or cache entry was lost
                p.counters[(request.route.project, "answered_from_history")] += 1
                return _recorded(request, prepared.text)
            outcome = await generate(p, request, prepared, stream)
            if p.devices is not None and outcome.tool_calls:
                outcome = await _device_rounds(p, request, prepared, outcome, stream)
        await _record(p, request, outcome, fence)
    return outcome


async def _device_rounds(p: Pipeline, request: Request, prompt: Prompt, first: Outcome, stream: Stream) -> Outcome:
    """Run the device tools the model called, and generate again (`rounds`), within the request's deadline.

    A forced `toolChoice` shaped the first generation; after results come back the model may answer.
    """
    assert p.devices is not None  # noqa: S101 - checked by the caller
    tools = request.tools
    later = dataclasses.replace(request, tools=ToolSet(tools.specs)) if tools is not None else request

    async def again(prompt: Prompt, round_no: int) -> Outcome:
        return await generate(p, later, prompt, stream, round_no)

    async def render(chat: Sequence[ChatMessage]) -> Prompt:
        return await p.engine.render(chat, later.tools)

    return await run_rounds(
        request, prompt, first, devices=p.devices, generate=again, render=render, event=stream.event
    )


async def _record(p: Pipeline, request: Request, outcome: Outcome, fence: Fence) -> None:
    """Record the turn to its end (see `_answer`): recorded, or `StateUnavailableError` when certainly not."""
    await _to_the_end(p.sessions.record(request, outcome.text, fence, outcome.tool_calls))


async def _to_the_end(step: Awaitable[T]) -> T:
    """Await `step` to its end, whatever happens to this task meanwhile.

    Recording a turn and sending its final reply are the point of no return: a cancel or the drain arriving
    then is too late to matter. It is taken back (`uncancel`), so the client hears the one outcome that
    happened, never "cancelled" for a turn that was recorded, nor a second final after the first went out.
    """
    task = asyncio.ensure_future(step)  # supervised: awaited to its end here
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
    return task.result()


def _recorded(request: Request, text: str) -> Outcome:
    """The outcome of a turn answered from the session's history (nothing generated, no tokens spent)."""
    now_ms = round((time.monotonic() - request.received_at) * 1000)
    return Outcome(text, "stop", 0, 0, 0, now_ms, now_ms, now_ms)  # (its calls, if any, were answered)


def _sent(job: Job, p: Pipeline, final: FinalReply | None) -> None:
    """Note the final reply that went out; None: another worker holds or answered the requestId since."""
    job.final = final
    if final is None:
        p.counters[(job.request.route.project, "superseded")] += 1
        log.warning("request.superseded", request_id=job.request.request_id, reason="claim lapsed and was taken")
        job.finished_silently = True


async def _claim(job: Job, p: Pipeline, stream: Stream) -> bool:
    """Claim a client-supplied requestId fleet-wide; False when this copy must not be generated.

    Answered before: the cached final reply goes out again. Held by a live worker (its lease renewed):
    wait; when that one answers, this copy ends silently (its one final reply is out); when its lease
    lapses (the holder died), this copy claims it and runs, so a crash never loses the request. A copy
    cancelled while it waits answers nothing, unless it can take the claim over (`_take_over`).
    """
    request = job.request
    if not request.client_supplied_id:
        return True
    delay, waited = 0.05, False
    job.awaiting_claim = True
    while True:
        claimed = await p.state.claim(request.dedupe_key)
        if claimed.verdict is Claim.NEW:
            _hold(job, p, stream)
            return True
        if claimed.verdict is Claim.DONE:
            job.awaiting_claim = False
            log.info("request.duplicate", request_id=request.request_id, state="done", waited=waited)
            if claimed.final is not None and not waited:
                p.counters[(request.route.project, "duplicates_resent")] += 1
                final = claimed.final
                try:
                    await p.replier.publish(final.topic, final.payload, final.correlation_data, wait=True)
                except PublishError as exc:  # its topic went bad since (the service's guard): counted, acked
                    log.warning("request.resend_failed", request_id=request.request_id, reason=str(exc))
                job.final = final
            else:
                p.counters[(request.route.project, "duplicates")] += 1
                job.finished_silently = True
            return False
        waited = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def _hold(job: Job, p: Pipeline, stream: Stream) -> None:
    job.awaiting_claim = False
    job.claimed = True
    stream.before_final = lambda final, code: _settle_claim(job, p, final, code)


async def _stopped(job: Job, p: Pipeline, stream: Stream) -> None:
    """A cancel or the drain stopped the job: answer why, or nothing (PROTOCOL 4, redelivery, a waiting copy)."""
    request = job.request
    reason = job.cancel_reason or ShuttingDownError()
    if await _silent_copy(job, p, stream):
        return  # the holder answers (a cancel reaches every worker)
    if isinstance(reason, RequestCancelledError) and request.route.dialect is Dialect.CLASSIC:
        p.counters[(request.route.project, "cancelled")] += 1  # classic: nothing further (PROTOCOL 4)
        job.finished_silently = True
    elif isinstance(reason, ShuttingDownError) and p.hold_for_redelivery:
        p.counters[(request.route.project, "left_for_redelivery")] += 1  # unacked: back after a restart
        job.left_for_redelivery = True
    else:
        await _fail(job, stream, p, reason)


async def _silent_copy(job: Job, p: Pipeline, stream: Stream) -> bool:
    """True: a copy stopped while it waited for another copy's claim stays silent (the holder answers).

    Stopped by a cancel, the drain or its deadline; it answers only if it could take the claim over.
    """
    if not job.awaiting_claim or await _take_over(job, p, stream):
        return False
    p.counters[(job.request.route.project, "duplicates")] += 1
    job.finished_silently = True
    return True


async def _take_over(job: Job, p: Pipeline, stream: Stream) -> bool:
    """A copy cancelled while waiting for the claim: answer only if nobody holds it now (the holder died).

    Someone alive holds it: that one answers (a cancel reaches every worker). Answered already: nothing more.
    """
    job.awaiting_claim = False
    try:
        claimed = await p.state.claim(job.request.dedupe_key)
    except WorkerError:
        return False
    if claimed.verdict is not Claim.NEW:
        return False
    _hold(job, p, stream)
    return True


async def _settle_claim(job: Job, p: Pipeline, final: FinalReply | None = None, code: ErrorCode | None = None) -> bool:
    """Cache the final reply for the requestId, or give the claim back (transient error, no reply).

    Called just before the final reply is published (a copy arriving right after it finds it cached),
    and again when the job ends (then it only gives back a claim that got no final reply). False when
    another worker holds or answered the requestId since (this one's claim lapsed): no final from here.
    """
    if not job.claimed:
        return True
    job.claimed = False
    if final is not None and code not in TRANSIENT:
        return await p.state.complete(job.request.dedupe_key, final)
    return await p.state.abandon(job.request.dedupe_key)


async def _fail(job: Job, stream: Stream, p: Pipeline, error: WorkerError) -> None:
    p.counters[(stream.route.project, "errors")] += 1
    if error.code in REFUSALS:
        p.counters[(stream.route.project, "rejected")] += 1
    log.info("request.failed_reply", project=stream.route.project, code=str(error.code))
    await _count(p, job.request, stream, error.code)
    _sent(job, p, await _to_the_end(stream.fail(error)))


async def _count(
    p: Pipeline, request: Request, stream: Stream, code: ErrorCode | None, *, replied: bool = True
) -> None:
    """Count what the request spent, once, in the state layer (fleet-wide, and this worker's own book).

    Called just before its final reply goes out (`code`: that reply's error), or when it ends without one.
    """
    if stream.spent.counted:
        return
    stream.spent.counted = True
    usage = usage_of(request, stream.spent, code, replied=replied)
    sending = p.state.record_usage(usage) if usage is not None else None
    if sending is not None:  # the shared backend: bounded, awaited to its end
        await _to_the_end(sending)


def _remaining_s(request: Request) -> float | None:
    if request.deadline_ms is None:
        return None
    return request.deadline_ms / 1000 - (time.monotonic() - request.received_at)
