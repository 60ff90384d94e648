"""Admission: decides at intake whether a request may start; the worker's memory never grows with load.

This is the bounded in-flight cap; dedupe windows, token buckets and fair share arrive with protocol v2.
"""

from __future__ import annotations

from worker.errors import OverloadedError, ShuttingDownError
from worker.protocol import Request


class Admission:
    """Bounded intake: at most `max_inflight` requests accepted and unfinished at once."""

    def __init__(self, max_inflight: int, retry_after_ms: int) -> None:
        self._max_inflight = max_inflight
        self._retry_after_ms = retry_after_ms
        self._inflight: set[str] = set()
        self.draining = False

    @property
    def inflight(self) -> int:
        """Accepted, unfinished requests."""
        return len(self._inflight)

    def is_duplicate(self, request: Request) -> bool:
        """A client-supplied requestId already running (a QoS1 redelivery): do not generate twice."""
        return request.client_supplied_id and request.request_id in self._inflight

    def admit(self, request: Request) -> None:
        """Take the request or raise `OverloadedError` / `ShuttingDownError`."""
        if self.draining:
            raise ShuttingDownError
        if len(self._inflight) >= self._max_inflight:
            raise OverloadedError(retry_after_ms=self._retry_after_ms)
        self._inflight.add(request.request_id)

    def release(self, request: Request) -> None:
        """The request's final reply is out."""
        self._inflight.discard(request.request_id)
