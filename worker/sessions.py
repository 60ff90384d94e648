"""Per-(project, session) chat history: builds the prompt for a request and records its answer.

History is trimmed by tokens (oldest turn pairs first) to `max_history_tokens` and, if needed, further
so that prompt + maxTokens fits the model's context. Sessions are capped (LRU) and forgotten after
`idle_ttl_s`. Requests of one session are serialised (`lock`) so each turn sees the previous answer;
different sessions run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.config import SessionsConfig
from worker.engine.base import ChatMessage, Engine, Prompt
from worker.errors import ContextTooLongError
from worker.protocol import Request

SessionKey = tuple[str, str]


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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    """In-memory sessions; see the module docstring."""

    def __init__(self, cfg: SessionsConfig, engine: Engine, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._engine = engine
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, project: str) -> int:
        """Sessions currently held for one project."""
        return sum(1 for p, _ in self._sessions if p == project)

    def get(self, key: SessionKey) -> Session:
        """The session for `key`, created if new; refreshes LRU order and evicts idle/oldest ones."""
        now = self._clock()
        self._expire(now)
        session = self._sessions.get(key)
        if session is None:
            session = Session()
            self._sessions[key] = session
            while len(self._sessions) > self._cfg.max_sessions:
                oldest_key, oldest = next(iter(self._sessions.items()))
                if oldest.lock.locked():  # never evict a session mid-request; the cap is soft then
                    break
                del self._sessions[oldest_key]
        self._sessions.move_to_end(key)
        session.last_used = now
        return session

    def lock_for(self, request: Request) -> asyncio.Lock | contextlib.nullcontext[None]:
        """The session's lock for stateful requests (one turn at a time); a no-op for stateless ones."""
        if request.messages is not None:
            return contextlib.nullcontext()
        return self.get(request.session_key).lock

    def reset(self, key: SessionKey) -> bool:
        """Forget a session's history and system-prompt override; True if it existed."""
        return self._sessions.pop(key, None) is not None

    def _expire(self, now: float) -> None:
        cutoff = now - self._cfg.idle_ttl_s
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.last_used >= cutoff or session.lock.locked():
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
        session = self.get(request.session_key)
        if request.system_prompt is not None:
            session.system_prompt = request.system_prompt
        if session.system_prompt is not None:
            system = ChatMessage("system", session.system_prompt)
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
        """Append the finished turn to the session (stateful requests only)."""
        if request.messages is not None or request.message is None:
            return
        session = self.get(request.session_key)
        tokens = await self._engine.count_tokens(request.message) + await self._engine.count_tokens(answer)
        session.turns.append(_Turn(request.message, answer, tokens))
        session.turns = self._trim(session.turns, self._cfg.max_history_tokens)
