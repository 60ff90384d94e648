"""`Job`: one accepted request and all its state; `JobTable`: the jobs in flight, the one place that acks.

The ack policy (PROTOCOL section 5), here and nowhere else:
- a message that did not become a job (refused, answered from the dedupe cache, a control command, a
  poison message) is acked at once: it is answered or counted, never redelivered in a loop;
- without a share group (MQTT 3.1.1, amqtt: no redelivery anyway) a job's message is acked at once too;
- with a share group a job's message is acked when the job settles, whatever its end (its final reply
  out, a deliberate "no reply" such as a classic client's cancel, or a failure of ours that left it
  unanswered: redelivering that would only repeat it); only a job stopped by the drain stays unacked, so
  the broker hands it to the restarted worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from worker.errors import WorkerError
from worker.message import InboundMessage
from worker.protocol import FinalReply, Request

log = structlog.get_logger(__name__)

JobKey = tuple[str, str, str]
"""`Request.dedupe_key`: (project, owner, requestId)."""


@dataclass(eq=False, slots=True)
class Job:
    """One accepted request: its task, why it was cancelled (if it was), its final reply, its unacked message."""

    request: Request
    task: asyncio.Task[None] | None = None
    message: InboundMessage | None = None
    """Held unacked until the job settles (share group only)."""
    cancel_reason: WorkerError | None = None
    final: FinalReply | None = None
    """What went out as the final reply (kept to answer redeliveries)."""
    finished_silently: bool = False
    """Ended on purpose without a final reply (a classic client's cancel): acked, never redelivered."""
    claimed: bool = False
    """It holds its requestId's dedupe claim (to complete or give back when it ends)."""
    awaiting_claim: bool = False
    """It waits for another copy's claim on its requestId: it answers nothing unless it takes the claim over."""
    left_for_redelivery: bool = False
    """Stopped by the drain on purpose, unanswered: its message stays unacked for the restarted worker."""

    @property
    def key(self) -> JobKey:
        """See `JobKey`."""
        return self.request.dedupe_key

    def cancel(self, reason: WorkerError) -> None:
        """Stop the job; `serve` answers `reason` (or stays silent, as PROTOCOL 4 says for classic cancel)."""
        self.cancel_reason = reason
        if self.task is not None:
            self.task.cancel()


class JobTable:
    """See the module docstring. `release` gives the job's admission slot back (with its final reply)."""

    def __init__(
        self,
        ack: Callable[[InboundMessage], None],
        release: Callable[[Request, FinalReply | None], None],
        *,
        hold_acks: bool,
    ) -> None:
        self._ack = ack
        self._release = release
        self.hold_acks = hold_acks
        self._jobs: dict[JobKey, Job] = {}
        self._replies: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, key: JobKey) -> Job | None:
        """The job in flight under `key`, if any."""
        return self._jobs.get(key)

    def took(self, msg: InboundMessage, job: Job | None) -> None:
        """Intake is done with `msg`: ack it now, or hold it until `job` settles."""
        if job is not None and self.hold_acks:
            job.message = msg
        else:
            self._ack(msg)

    def start(self, job: Job, serve: Coroutine[Any, Any, None]) -> Job:
        """Run `serve` as the job's task; the job settles when it ends."""
        job.task = asyncio.ensure_future(serve)  # supervised: _settle collects its end
        self._jobs[job.key] = job
        job.task.add_done_callback(lambda task: self._settle(job, task))
        return job

    def reply(self, send: Awaitable[None]) -> None:
        """Publish a reply that belongs to no job (a refusal, a resend); drain waits for it too."""
        task = asyncio.ensure_future(send)  # supervised: _reply_done collects its end
        self._replies.add(task)
        task.add_done_callback(self._reply_done)

    def _settle(self, job: Job, task: asyncio.Task[None]) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if not task.cancelled() and (exc := task.exception()) is not None:  # serve catches everything: a bug
            log.error("job.failed", request_id=job.request.request_id, exc_info=exc)
        if job.final is None and not job.finished_silently and not job.left_for_redelivery:
            log.error("job.unanswered", project=job.request.route.project, request_id=job.request.request_id)
        if job.message is not None and not job.left_for_redelivery:
            self._ack(job.message)  # settled: never redelivered in a loop (a drained-away job stays unacked)
        self._release(job.request, job.final)

    def _reply_done(self, task: asyncio.Task[None]) -> None:
        self._replies.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("reply.failed", exc_info=exc)

    async def drain(self, timeout_s: float, on_pending: Callable[[Job], None]) -> int:
        """Wait up to `timeout_s` for jobs and replies; `on_pending` each job still running; returns their count."""
        tasks = {job.task for job in self._jobs.values() if job.task is not None} | self._replies
        if not tasks:
            return 0
        await asyncio.wait(tasks, timeout=timeout_s)
        pending = [job for job in self._jobs.values() if job.task is not None and not job.task.done()]
        for job in pending:
            on_pending(job)
        leftovers = {job.task for job in pending if job.task is not None} | self._replies
        if leftovers:
            await asyncio.wait(leftovers, timeout=5)
        return len(pending)
