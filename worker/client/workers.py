"""Which workers are ready for which project, from their retained statuses (what a client routes by).

A status is broker data: what is kept of it is bounded (`MAX_WORKERS_TRACKED` workers, `MAX_PROJECTS`
names of at most `MAX_NAME_CHARS` each), never trusted as more than a hint.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from worker.transport.bus import Bus

MAX_WORKERS_TRACKED = 1024
MAX_PROJECTS, MAX_NAME_CHARS = 256, 128
"""What is kept of a worker's project list (a status is broker data: bounded in bytes, not only entries)."""
STATUS_GRACE_S = 0.5
"""Retained statuses arrive right after subscribing: only after this long is a client said to wait."""


class Workers:
    """The ready workers seen on `{prefix}vllm-worker/+/status`; subscribed on first use."""

    def __init__(self, bus: Bus, topic_prefix: str) -> None:
        self._bus = bus
        self._prefix = f"{topic_prefix}vllm-worker/"
        self._ready: dict[str, frozenset[str]] = {}  # worker -> projects, for workers whose status is ready
        self._changed = asyncio.Event()
        self.watched = False

    def is_status(self, topic: str) -> bool:
        """Whether a topic is a worker's status."""
        return topic.startswith(self._prefix) and topic.endswith("/status")

    def ready(self, worker: str, project: str | None = None) -> bool:
        """Whether `worker` says ready (and serves `project`, when given)."""
        projects = self._ready.get(worker)
        return projects is not None and (project is None or project in projects)

    def serving(self, project: str) -> bool:
        """Whether some ready worker serves `project`."""
        return any(project in projects for projects in self._ready.values())

    def note(self, topic: str, payload: bytes) -> None:
        """Track one status message (bounded: MAX_WORKERS_TRACKED)."""
        worker = topic[len(self._prefix) : -len("/status")]
        self._ready.pop(worker, None)
        try:
            body = json.loads(payload) if payload else {}
        except (ValueError, UnicodeDecodeError):
            body = {}
        projects = body.get("projects") if isinstance(body, dict) else None
        if isinstance(body, dict) and body.get("state") == "ready" and isinstance(projects, list):
            names = (p for p in projects[:MAX_PROJECTS] if isinstance(p, str) and 0 < len(p) <= MAX_NAME_CHARS)
            self._ready[worker] = frozenset(names)
            while len(self._ready) > MAX_WORKERS_TRACKED:
                del self._ready[next(iter(self._ready))]
        self._changed.set()

    async def watch(self) -> None:
        """Subscribe once to the workers' retained statuses."""
        if not self.watched:
            self.watched = True
            await self._bus.subscribe([f"{self._prefix}+/status"])

    async def until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Return once `done()` holds (checked now and after each status); TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not done():
                self._changed.clear()
                await self._changed.wait()
