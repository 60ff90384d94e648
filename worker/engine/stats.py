"""`StatsAggregator`: folds vLLM's per-step scheduler/iteration stats into an `EngineStats` snapshot.

vLLM calls its stat loggers on every engine step, so `record` only updates counters and windows;
`snapshot` (called from the telemetry timer) does the arithmetic. vLLM documents these stat classes as
unstable, so every field is read with `getattr` and a default.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from worker.engine.base import EngineStats

WINDOW_S = 30.0
"""Rates and percentiles cover the last WINDOW_S seconds."""


class StatsAggregator:
    """Thread-safe aggregation of vLLM stats (see module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._window_s = window_s
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._preemptions = 0
        # (time, prompt tokens, generation tokens, prefix queries, prefix hits) per engine step
        self._steps: deque[tuple[float, int, int, int, int]] = deque()
        self._ttft_s: deque[tuple[float, float]] = deque(maxlen=2048)
        self._tpot_s: deque[tuple[float, float]] = deque(maxlen=2048)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:  # noqa: ANN401 - vLLM's unstable types
        """Fold one engine step in (cheap: runs on every step)."""
        now = self._clock()
        with self._lock:
            if scheduler_stats is not None:
                self._running = int(getattr(scheduler_stats, "num_running_reqs", 0) or 0)
                self._waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0) or 0)
                self._kv_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                queries = int(getattr(prefix, "queries", 0) or 0)
                hits = int(getattr(prefix, "hits", 0) or 0)
            else:
                queries = hits = 0
            prompt = gen = 0
            if iteration_stats is not None:
                gen = int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
                prompt_stats = getattr(iteration_stats, "prompt_token_stats", None)
                prompt = int(getattr(prompt_stats, "total", 0) or 0)
                self._preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)
                for ttft in getattr(iteration_stats, "time_to_first_tokens_iter", ()) or ():
                    self._ttft_s.append((now, float(ttft)))
                for finished in getattr(iteration_stats, "finished_requests", ()) or ():
                    tpot = getattr(finished, "mean_time_per_output_token", None)
                    if tpot:
                        self._tpot_s.append((now, float(tpot)))
            if prompt or gen or queries:
                self._steps.append((now, prompt, gen, queries, hits))
            self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self._window_s
        while self._steps and self._steps[0][0] < cutoff:
            self._steps.popleft()

    def snapshot(self) -> EngineStats:
        """The current aggregate (rates over the window, p50 over the window)."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            cutoff = now - self._window_s
            prompt = sum(s[1] for s in self._steps)
            gen = sum(s[2] for s in self._steps)
            queries = sum(s[3] for s in self._steps)
            hits = sum(s[4] for s in self._steps)
            span = max(min(self._window_s, now - self._steps[0][0]), 1.0) if self._steps else 1.0
            ttft = [v for t, v in self._ttft_s if t >= cutoff]
            tpot = [v for t, v in self._tpot_s if t >= cutoff]
            return EngineStats(
                running=self._running,
                waiting=self._waiting,
                kv_cache_usage=self._kv_usage,
                prefix_cache_hit_rate=hits / queries if queries else 0.0,
                prompt_tok_per_s=prompt / span,
                gen_tok_per_s=gen / span,
                ttft_ms_p50=statistics.median(ttft) * 1000 if ttft else 0.0,
                tpot_ms_p50=statistics.median(tpot) * 1000 if tpot else 0.0,
                preemptions=self._preemptions,
            )
