"""`Pipeline`: what the request path needs, built once by the service and shared by every job."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.engine.adapters import AdapterTable
from worker.engine.base import Engine
from worker.protocol import Request
from worker.serving.devices import DeviceTools
from worker.serving.replies import Replier
from worker.serving.sessions import SessionStore
from worker.state import Budget, Quota, State


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What `serve` needs: the steps of the path and the few settings that change it."""

    engine: Engine
    adapters: AdapterTable
    """Each project's current LoRA adapter (a request keeps the one it started with)."""
    state: State
    sessions: SessionStore
    budgets: Callable[[Request], Sequence[Budget]]
    """The token buckets a request takes from (`Admission.budgets`)."""
    quotas: Callable[[Request], Sequence[Quota]]
    """The daily quotas a request is checked against (`Admission.quotas`)."""
    replier: Replier
    counters: Counter[tuple[str, str]]
    on_engine_death: Callable[[], None]
    ignore_eos: bool = False
    """Benchmarks: every answer runs to maxTokens."""
    priority_scheduling: bool = False
    """Pass the request's priority to the engine (else 0: fcfs)."""
    hold_for_redelivery: bool = False
    """Share group: a job stopped by the drain is left unacked for redelivery rather than answered."""
    devices: DeviceTools | None = None
    """The projects' device tools, run by this worker when the model calls them (`rounds`)."""
