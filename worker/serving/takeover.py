"""`Takeover`: a live worker serves what a dead peer's broker session holds, then ends that session.

Mosquitto keeps an offline persistent session's place in a share group: it goes on being assigned its
share of requests, which wait in its queue for up to `session_expiry_s` (an hour), and for good when the
peer's host never comes back. A peer whose retained status has said `offline` for `takeover_after_s` is
taken over by one live worker (elected with a fleet-wide claim in the state backend): it connects with
the peer's client id, resuming the session, so the broker delivers what is queued; it unsubscribes the
peer's filters so no new share is assigned; it serves what arrives through its own request path; then
it disconnects with Session Expiry 0 and the broker drops the session and its place in the group.

If the peer comes back meanwhile, the broker hands the session back to it (our connection is closed and
never reopened): requests we took and did not finish are redelivered to it, and fleet-wide dedupe keeps
what we already answered from being generated twice. Only peers whose projects this worker serves are
taken over (it could not answer the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker.config import BrokerConfig
from worker.message import InboundMessage
from worker.serving.intake import Intake
from worker.serving.jobs import JobTable
from worker.state import Claim, State
from worker.transport.bus import Bus, BusFailedError, BusLostError

log = structlog.get_logger(__name__)
MAX_PEERS = 1024
"""Peers remembered (what other workers publish is bounded like any broker data)."""
MAX_STATUS_BYTES = 64 * 1024
MAX_PROJECTS, MAX_NAME_CHARS = 256, 128
"""What is kept of a peer's project list: at most 32 KiB a peer, 32 MiB for MAX_PEERS."""
QUIET_S = 2.0
"""The peer's queue counts as drained once nothing arrived for this long and nothing it held still runs."""
CHECK_EVERY_S = 1.0


@dataclass(slots=True)
class _Peer:
    projects: frozenset[str]
    offline_since: float | None


class Takeover:
    """Watches peers' statuses (`observe`) and takes over the sessions of those that stay offline (`run`)."""

    def __init__(
        self,
        cfg: BrokerConfig,
        worker_id: str,
        projects: frozenset[str],
        state: State,
        *,
        after_s: float,
        status_prefix: str,
        filters: Callable[[str, frozenset[str]], list[str]],
        intake: Callable[[Callable[[InboundMessage], None]], tuple[Intake, JobTable]],
        receive_maximum: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._me = worker_id
        self._projects = projects
        self._state = state
        self._after_s = after_s
        self._status_prefix = status_prefix
        """`{topic_prefix}vllm-worker/`: a peer's status is `{status_prefix}{peer}/status`."""
        self._filters = filters
        self._intake = intake
        self._receive_maximum = receive_maximum
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self.taken = 0
        """Sessions taken over and ended (telemetry, tests)."""

    def observe(self, msg: InboundMessage) -> bool:
        """Note a peer's status (True: the message was one, consumed here). Never raises."""
        prefix, suffix = self._status_prefix, "/status"
        topic = msg.topic
        if not (topic.startswith(prefix) and topic.endswith(suffix)):
            return False
        peer = topic[len(prefix) : -len(suffix)]
        if peer == self._me or "/" in peer or not peer:
            return True
        body = _status(msg.payload)
        if body is None:  # an empty retained status (the peer was retired) or an unreadable one: forget it
            self._peers.pop(peer, None)
            return True
        state, projects = body
        known = self._peers.pop(peer, None)
        since = (known.offline_since if known else None) or self._clock() if state == "offline" else None
        self._peers[peer] = _Peer(projects, since)  # most recently heard last
        while len(self._peers) > MAX_PEERS:
            del self._peers[next(iter(self._peers))]
        return True

    def due(self) -> list[str]:
        """Peers offline for `after_s` whose projects this worker serves."""
        now = self._clock()
        return [
            peer
            for peer, p in self._peers.items()
            if p.offline_since is not None and now - p.offline_since >= self._after_s and p.projects <= self._projects
        ]

    async def run(self) -> None:
        """Forever: take over due peers, one at a time (a supervised loop)."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            for peer in self.due():
                await self._try(peer)

    async def _try(self, peer: str) -> None:
        """Take over `peer` if this worker wins the election; errors cost a log line and a later retry."""
        key = ("vllm-worker", "takeover", peer)
        try:
            won = (await self._state.claim(key)).verdict is Claim.NEW
        except Exception:  # noqa: BLE001 - the backend is away: try again at the next check
            log.warning("takeover.election_failed", peer=peer)
            return
        if not won:
            return
        try:
            served = await self._serve(peer)
            self.taken += 1
            self._peers.pop(peer, None)
            log.info("takeover.done", peer=peer, served=served)
        except (BusLostError, BusFailedError):
            log.info("takeover.handed_back", peer=peer, reason="the peer came back and took its session")
            self._peers.pop(peer, None)
        except Exception:
            log.exception("takeover.failed", peer=peer)
        finally:
            with contextlib.suppress(Exception):
                await self._state.abandon(key)

    async def _serve(self, peer: str) -> int:
        """Resume the peer's session, serve what it holds, end it; returns how many messages it delivered."""
        projects = self._peers[peer].projects
        log.warning("takeover.started", peer=peer, projects=sorted(projects), offline_s=self._after_s)
        bus = Bus(self._cfg, peer, persistent=True, receive_maximum=self._receive_maximum, reconnect=False)
        served = 0
        async with bus:
            await bus.unsubscribe(self._filters(peer, projects))  # no new share: only what is queued comes
            intake, jobs = self._intake(bus.ack)  # this worker's request path, acking on the peer's session
            while True:
                try:
                    async with asyncio.timeout(QUIET_S):
                        msg = await bus.messages()
                except TimeoutError:
                    if len(jobs) == 0:
                        break
                    continue
                served += 1
                intake.take(msg)
            bus.end_session = True
        return served


def _status(payload: bytes) -> tuple[str, frozenset[str]] | None:
    """(state, projects) of a status message, or None when it is empty or not one (never raises)."""
    if not payload or len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    state, projects = body.get("state"), body.get("projects")
    if not isinstance(state, str) or not isinstance(projects, list):
        return None
    names = (p for p in projects[:MAX_PROJECTS] if isinstance(p, str) and 0 < len(p) <= MAX_NAME_CHARS)
    return state, frozenset(names)
