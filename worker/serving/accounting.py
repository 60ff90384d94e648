"""What one request spent, added up as it runs and counted once when it ends (issue 31).

Tokens are counted where the engine reports them (`generation`), so a request cancelled, expired or
failed after it generated still counts what it cost. Just before its final reply goes out, `serve`
hands the sum to the state layer (fleet-wide counters and quotas: `state/usage.py`; its in-process book
of this worker's own counts feeds telemetry): a client that waits for its reply before it sends the
next request is checked against budgets that include it. A request that ends without a reply of its
own counts only if it generated. A request that never ran (a duplicate answered from the dedupe cache,
a copy left to the worker that holds its requestId) counts nothing; one refused by a rate limit or a
quota counts as `refused`.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import ErrorCode
from worker.protocol import Request
from worker.serving.admission import client_key
from worker.state import Counts, Usage

REFUSALS = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED})


@dataclass(slots=True)
class Spent:
    """A request's tokens so far, over every generation it ran (device-tool rounds add up, as `usage` does)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    counted: bool = False
    """Handed to the counters already (a request counts once, whatever happens after)."""

    def generation(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One generation reached the engine's first output: its prompt was prefilled (part from cache)."""
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens


def usage_of(request: Request, spent: Spent, code: ErrorCode | None, *, replied: bool) -> Usage | None:
    """The counts of a request that ended; None when it neither ran nor was refused.

    It ends with a final reply (`code`: its error, None: an answer) or, when not `replied`, without one.
    """
    generated = spent.prompt_tokens or spent.completion_tokens
    if not replied and not generated:
        return None
    refused = code in REFUSALS and not generated
    counts = Counts(
        requests=0 if refused else 1,
        prompt_tokens=spent.prompt_tokens,
        completion_tokens=spent.completion_tokens,
        cached_tokens=spent.cached_tokens,
        errors=int((code is not None or not replied) and not refused),
        refused=int(refused),
    )
    return Usage(request.route.project, client_key(request)[1], counts)
