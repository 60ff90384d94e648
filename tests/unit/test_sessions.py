import pytest

from worker.config import SessionsConfig
from worker.engine.fake import FakeEngine
from worker.errors import ContextTooLongError
from worker.message import InboundMessage
from worker.protocol import Topics, parse
from worker.serving.sessions import SessionStore


def request(projects, message, session="s1", **fields):
    import json

    body = json.dumps({"message": message, "sessionId": session, **fields}).encode()
    return parse(InboundMessage("maze/user_input", body), projects, Topics(), 256 * 1024)


async def turn(store, projects, message, answer, session="s1"):
    req = request(projects, message, session)
    prompt = await store.build_prompt(req)
    await store.record(req, answer)
    return prompt


async def test_history_is_kept_per_session(projects):
    store = SessionStore(SessionsConfig(), FakeEngine())
    await turn(store, projects, "first question", "first answer")
    prompt = await turn(store, projects, "second question", "second answer")
    assert [m.content for m in prompt.messages[1:]] == ["first question", "first answer", "second question"]
    other = await store.build_prompt(request(projects, "hello", session="s2"))
    assert [m.content for m in other.messages[1:]] == ["hello"]


async def test_history_is_trimmed_by_tokens_oldest_first(projects):
    # each recorded turn costs 4 whitespace tokens ("qN x" + "aN y")
    store = SessionStore(SessionsConfig(max_history_tokens=9), FakeEngine())
    for i in range(5):
        await turn(store, projects, f"q{i} x", f"a{i} y")
    prompt = await store.build_prompt(request(projects, "now"))
    contents = [m.content for m in prompt.messages[1:]]
    assert contents == ["q3 x", "a3 y", "q4 x", "a4 y", "now"]


async def test_zero_history_tokens_keeps_no_history(projects):
    store = SessionStore(SessionsConfig(max_history_tokens=0), FakeEngine())
    await turn(store, projects, "q", "a")
    prompt = await store.build_prompt(request(projects, "now"))
    assert [m.content for m in prompt.messages[1:]] == ["now"]


async def test_history_is_trimmed_to_fit_the_context(projects):
    engine = FakeEngine(max_model_len=300)
    store = SessionStore(SessionsConfig(max_history_tokens=10_000), engine)
    for i in range(10):
        await turn(store, projects, " ".join(["w"] * 20) + f" {i}", "ok")
    req = request(projects, "now", maxTokens=50)
    prompt = await store.build_prompt(req)
    assert len(prompt.token_ids) + 50 <= 300
    assert prompt.messages[-1].content == "now"
    assert prompt.messages[-2].content == "ok"  # the newest turns survive


async def test_prompt_that_cannot_fit_is_context_too_long(projects):
    store = SessionStore(SessionsConfig(), FakeEngine(max_model_len=100))
    with pytest.raises(ContextTooLongError):
        await store.build_prompt(request(projects, " ".join(["w"] * 200), maxTokens=10))


async def test_lru_cap_forgets_least_recent_session(projects):
    store = SessionStore(SessionsConfig(max_sessions=2), FakeEngine())
    await turn(store, projects, "q", "a", session="a")
    await turn(store, projects, "q", "a", session="b")
    await turn(store, projects, "q", "a", session="a")  # refresh a
    await turn(store, projects, "q", "a", session="c")  # evicts b
    assert store.count("maze") == 2
    prompt_b = await store.build_prompt(request(projects, "again", session="b"))
    assert [m.content for m in prompt_b.messages[1:]] == ["again"]


async def test_idle_sessions_expire(projects):
    now = [0.0]
    store = SessionStore(SessionsConfig(idle_ttl_s=10), FakeEngine(), clock=lambda: now[0])
    await turn(store, projects, "q", "a")
    now[0] = 11.0
    prompt = await store.build_prompt(request(projects, "later"))
    assert [m.content for m in prompt.messages[1:]] == ["later"]


async def test_system_prompt_override_sticks_to_the_session(projects):
    store = SessionStore(SessionsConfig(), FakeEngine())
    req = request(projects, "hi", systemPrompt="You are a pirate.")
    first = await store.build_prompt(req)
    await store.record(req, "arr")
    second = await store.build_prompt(request(projects, "again"))
    assert first.messages[0].content == second.messages[0].content == "You are a pirate."
    assert await store.reset(("maze", "", "s1"))
    third = await store.build_prompt(request(projects, "again"))
    assert third.messages[0].content == projects["maze"].system_prompt


async def test_stateless_messages_do_not_touch_history(projects):
    store = SessionStore(SessionsConfig(), FakeEngine())
    import json

    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "sessionId": "s1"}).encode()
    req = parse(InboundMessage("maze/user_input", body), projects, Topics(), 256 * 1024)
    await store.build_prompt(req)
    await store.record(req, "answer")
    assert store.count("maze") == 0
