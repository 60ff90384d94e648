"""Per-(project, session) chat history: builds the prompt for a request and records its answer.

History is trimmed by tokens (oldest turn pairs first) to `max_history_tokens` and, if needed, further
so that prompt + maxTokens fits the model's context. Where history lives is the state layer's business
(`worker.state`: this process, or Redis for a fleet); requests of one session are serialised (`turn`,
the state's session lock) so each turn sees the previous answer; different sessions run concurrently.

Validate first, mutate after: building a prompt changes nothing; a session (and its system-prompt
override) is stored only by `record`, once its turn has an answer. A refused request leaves no trace,
so hostile traffic cannot poison a session or grow memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from worker.config import SessionsConfig
from worker.engine.base import Engine, Prompt
from worker.errors import BadRequestError, ContextTooLongError
from worker.protocol import ChatMessage, Request
from worker.protocol.tools import ToolCall
from worker.state import History, MemoryState, State, Turn
from worker.state.base import Fence, SessionKey
from worker.state.memory import MemoryLimits, recorded_answer, trim


@dataclass(frozen=True, slots=True)
class Recorded:
    """A request's turn is in its session already: the answer recorded for it."""

    text: str


class SessionStore:
    """See the module docstring."""

    def __init__(
        self,
        cfg: SessionsConfig,
        engine: Engine,
        state: State | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._engine = engine
        self._state = state or MemoryState(MemoryLimits(cfg.max_sessions, cfg.idle_ttl_s), clock)

    def count(self, project: str) -> int | None:
        """Sessions held for one project (None when the backend does not count them)."""
        return self._state.sessions(project)

    @contextlib.asynccontextmanager
    async def turn(self, request: Request) -> AsyncIterator[Fence]:
        """Hold the session's turn for a stateful request (one turn at a time); a no-op for stateless ones.

        Yields the fence `record` passes on: a holder whose lease lapsed records nothing.
        """
        if request.messages is not None:
            yield None
            return
        async with self._state.lock(request.session_key) as fence:
            yield fence

    async def reset(self, key: SessionKey) -> bool:
        """Forget a session's history and system-prompt override, in turn order; True if it existed."""
        async with self._state.lock(key):
            return await self._state.reset(key)

    async def build_prompt(self, request: Request) -> Prompt | Recorded:
        """Render system + trimmed history + this turn; raises `ContextTooLongError` when it cannot fit.

        `Recorded` when the session already holds this requestId's turn (an earlier copy was recorded and
        its reply, or its cache entry, was lost): it is answered from there, never generated twice.
        """
        max_tokens = request.sampling.max_tokens
        budget = self._engine.max_model_len - max_tokens
        system = ChatMessage("system", request.system_prompt or request.project.system_prompt)
        if request.messages is not None:  # stateless: the client sent the whole chat
            chat = list(request.messages)
            if chat[0].role != "system":
                chat.insert(0, system)
            return await self._fit(chat, budget, max_tokens, request)
        session: History = await self._state.load(request.session_key)
        if request.client_supplied_id and (answer := recorded_answer(session, request.request_id)) is not None:
            return Recorded(answer)
        override = request.system_prompt or session.system_prompt
        if override is not None:
            system = ChatMessage("system", override)
        _check_results(request, session.turns)
        turns = trim(session.turns, self._cfg.max_history_tokens)
        this_turn = [ChatMessage("tool", r.content, tool_call_id=r.tool_call_id) for r in request.tool_results]
        if request.message is not None:
            this_turn.append(ChatMessage("user", request.message))
        while True:
            prompt = await self._engine.render([system, *history_chat(turns), *this_turn], request.tools)
            if len(prompt.token_ids) <= budget or not turns:
                break
            turns = trim(turns[1:], self._cfg.max_history_tokens)  # a whole tool round at a time
        return await self._fit(list(prompt.messages), budget, max_tokens, request, prompt)

    async def _fit(
        self, chat: list[ChatMessage], budget: int, max_tokens: int, request: Request, prompt: Prompt | None = None
    ) -> Prompt:
        prompt = prompt or await self._engine.render(chat, request.tools)
        if len(prompt.token_ids) > budget:
            raise ContextTooLongError(
                f"prompt has {len(prompt.token_ids)} tokens + maxTokens {max_tokens} > "
                f"context {self._engine.max_model_len}"
            )
        return prompt

    async def record(
        self, request: Request, answer: str, fence: Fence = None, calls: tuple[ToolCall, ...] = ()
    ) -> None:
        """Append the finished turn to the session (stateful requests only); stores a systemPrompt override.

        The turn keeps the tool results it began with and the calls it made, so the next turn can answer
        them. At most once per requestId, only while `fence` holds the turn; raises `StateUnavailableError`
        only when the turn is certainly not recorded (see `State.append`).
        """
        if request.messages is not None:
            return
        user = request.message or ""
        texts = [user, answer, *(r.content for r in request.tool_results), *(c.arguments for c in calls)]
        tokens = await self._engine.count_tokens(*texts)
        turn = Turn(user, answer, tokens, request.request_id, calls, request.tool_results)
        await self._state.append(request.session_key, turn, request.system_prompt, self._cfg.max_history_tokens, fence)


def history_chat(turns: tuple[Turn, ...]) -> list[ChatMessage]:
    """The stored turns as chat messages; a turn's calls show only where the next turn answers them."""
    chat: list[ChatMessage] = []
    for i, turn in enumerate(turns):
        chat += [ChatMessage("tool", r.content, tool_call_id=r.tool_call_id) for r in turn.tool_results]
        if turn.user:
            chat.append(ChatMessage("user", turn.user))
        answered = i + 1 < len(turns) and bool(turns[i + 1].tool_results)
        chat.append(ChatMessage("assistant", turn.assistant, tool_calls=turn.tool_calls if answered else ()))
    return chat


def _check_results(request: Request, turns: tuple[Turn, ...]) -> None:
    """`toolResults` must answer exactly the calls the session's last turn made (BadRequestError if not)."""
    if not request.tool_results:
        return
    pending = {c.id for c in turns[-1].tool_calls} if turns else set()
    if not pending:
        raise BadRequestError("toolResults: the session's last turn made no tool calls")
    given = {r.tool_call_id for r in request.tool_results}
    if given != pending:
        raise BadRequestError(f"toolResults must answer exactly the last turn's calls: {sorted(pending)[:16]}")
