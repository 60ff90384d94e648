"""Per-(project, session) chat history: builds the prompt for a request and records its answer.

History is trimmed by tokens (oldest turn pairs first) to `max_history_tokens` and, if needed, further
so that prompt + maxTokens fits the model's context. Sessions are capped (LRU) and forgotten after
`idle_ttl_s`. Requests of one session are serialised (`turn`) so each turn sees the previous answer;
different sessions run concurrently.

Validate first, mutate after: building a prompt changes nothing; a session (and its system-prompt
override) is stored only by `record`, once its turn has an answer. A refused request leaves no trace,
so hostile traffic cannot poison a session or grow memory. Turn locks live apart from sessions and are
dropped when nobody holds or waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from worker.config import SessionsConfig
from worker.engine.base import Engine, Prompt
from worker.errors import ContextTooLongError
from worker.protocol import ChatMessage, Request

SessionKey = tuple[str, str, str]
"""(project, owner, sessionId): see `Request.session_key`."""


@dataclass(slots=True)
class _Turn:
    user: str
    assistant: str
    tokens: int


@dataclass(slots=True)
class Session:
    """One conversation's state."""

    turns: list[_Turn] = field(default_factory=list)
    system_prompt: str | None = None
    last_used: float = 0.0


@dataclass(slots=True)
class _TurnLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SessionStore:
    """In-memory sessions; see the module docstring."""

    def __init__(self, cfg: SessionsConfig, engine: Engine, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._engine = engine
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self._turns: dict[SessionKey, _TurnLock] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, project: str) -> int:
        """Sessions currently held for one project."""
        return sum(1 for key in self._sessions if key[0] == project)

    def peek(self, key: SessionKey) -> Session | None:
        """The stored session, if any (idle ones are forgotten first); creates nothing."""
        self._expire(self._clock())
        return self._sessions.get(key)

    def _get_or_create(self, key: SessionKey) -> Session:
        """The session for `key`, created if new; refreshes LRU order and evicts idle/oldest ones."""
        now = self._clock()
        self._expire(now)
        session = self._sessions.get(key)
        if session is None:
            session = Session()
            self._sessions[key] = session
            while len(self._sessions) > self._cfg.max_sessions:
                oldest_key = next(iter(self._sessions))
                if oldest_key in self._turns:  # never evict a session mid-turn; the cap is soft then
                    break
                del self._sessions[oldest_key]
        self._sessions.move_to_end(key)
        session.last_used = now
        return session

    @contextlib.asynccontextmanager
    async def turn(self, request: Request) -> AsyncIterator[None]:
        """Hold the session's turn for a stateful request (one turn at a time); a no-op for stateless ones."""
        if request.messages is not None:
            yield
            return
        key = request.session_key
        entry = self._turns.setdefault(key, _TurnLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._turns[key]

    def reset(self, key: SessionKey) -> bool:
        """Forget a session's history and system-prompt override; True if it existed."""
        return self._sessions.pop(key, None) is not None

    def _expire(self, now: float) -> None:
        cutoff = now - self._cfg.idle_ttl_s
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.last_used >= cutoff or key in self._turns:
                return
            del self._sessions[key]

    async def build_prompt(self, request: Request) -> Prompt:
        """Render system + trimmed history + this turn; raises `ContextTooLongError` when it cannot fit."""
        max_tokens = request.sampling.max_tokens
        budget = self._engine.max_model_len - max_tokens
        system = ChatMessage("system", request.system_prompt or request.project.system_prompt)
        if request.messages is not None:  # stateless: the client sent the whole chat
            chat = list(request.messages)
            if chat[0].role != "system":
                chat.insert(0, system)
            return await self._fit(chat, budget, max_tokens)
        session = self.peek(request.session_key) or Session()
        override = request.system_prompt or session.system_prompt
        if override is not None:
            system = ChatMessage("system", override)
        assert request.message is not None  # noqa: S101 - parse guarantees message or messages
        turns = self._trim(session.turns, self._cfg.max_history_tokens)
        while True:
            chat = [system]
            for turn in turns:
                chat += [ChatMessage("user", turn.user), ChatMessage("assistant", turn.assistant)]
            chat.append(ChatMessage("user", request.message))
            prompt = await self._engine.render(chat)
            if len(prompt.token_ids) <= budget or not turns:
                break
            turns = turns[1:]
        return await self._fit(list(prompt.messages), budget, max_tokens, prompt)

    async def _fit(self, chat: list[ChatMessage], budget: int, max_tokens: int, prompt: Prompt | None = None) -> Prompt:
        prompt = prompt or await self._engine.render(chat)
        if len(prompt.token_ids) > budget:
            raise ContextTooLongError(
                f"prompt has {len(prompt.token_ids)} tokens + maxTokens {max_tokens} > "
                f"context {self._engine.max_model_len}"
            )
        return prompt

    @staticmethod
    def _trim(turns: list[_Turn], max_tokens: int) -> list[_Turn]:
        kept: list[_Turn] = []
        total = 0
        for turn in reversed(turns):
            total += turn.tokens
            if total > max_tokens:
                break
            kept.append(turn)
        kept.reverse()
        return kept

    async def record(self, request: Request, answer: str) -> None:
        """Append the finished turn to the session (stateful requests only); stores a systemPrompt override."""
        if request.messages is not None or request.message is None:
            return
        session = self._get_or_create(request.session_key)
        if request.system_prompt is not None:
            session.system_prompt = request.system_prompt
        tokens = await self._engine.count_tokens(request.message) + await self._engine.count_tokens(answer)
        session.turns.append(_Turn(request.message, answer, tokens))
        session.turns = self._trim(session.turns, self._cfg.max_history_tokens)
