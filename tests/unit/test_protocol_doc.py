"""docs/protocol.md stays honest: every error code, request field and topic pattern the code defines is in
it, and its tables list nothing the code lacks (its `| code |`, `| field |` and `| topic |` tables)."""

import inspect
import itertools
import re
from collections import Counter
from pathlib import Path

import pytest

from worker.config import WorkerConfig
from worker.engine.fake import FakeEngine
from worker.errors import ErrorCode
from worker.projects import Project
from worker.protocol import KNOWN_FIELDS, Dialect, Topics

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

# How each parameter of a `Topics` method is spelled in the doc. A new parameter name fails the test
# until it is given a placeholder here (and the topic it builds is documented).
PLACEHOLDERS: dict[str, list[object]] = {
    "project": ["{project}"],
    "session_id": ["{sessionId}"],
    "who": ["{clientId}", "{sessionId}"],  # v2 replies: the clientId, else the sessionId
    "dialect": list(Dialect),
    "worker_id": ["{workerId}"],
    "device": ["{deviceId}"],
    "tool": ["{tool}"],
}
TOPIC_PARSERS = {"control_kind", "split_request", "is_tool_topic", "is_direct"}
"""`Topics` methods that read a topic instead of building one."""
PROJECT_TELEMETRY = "{project}/telemetry"
"""Built inline by `StatusReporter.telemetry_loop` (`worker.project_telemetry`)."""
BACKTICKED = re.compile(r"`([^`]+)`")


def topic_builders() -> set[str]:
    """Every topic (or reply prefix) a `Topics` method builds, with the doc's placeholders."""
    topics = Topics()
    built: set[str] = set()
    for name, method in inspect.getmembers(topics, inspect.ismethod):
        if name.startswith("_") or name in TOPIC_PARSERS:
            continue
        params = list(inspect.signature(method).parameters)
        unknown = [p for p in params if p not in PLACEHOLDERS]
        assert not unknown, f"Topics.{name} takes {unknown}: give them a placeholder and document the topic"
        for args in itertools.product(*(PLACEHOLDERS[p] for p in params)):
            built.add(method(*args))
    return built


def service_topics() -> set[str]:
    """What the service subscribes and publishes beyond `Topics`: shared filters, status, telemetry, control."""
    from worker.service import Service  # imported here: it pulls in the whole worker

    cfg = WorkerConfig()
    cfg = cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"id": "{workerId}"})})
    project = Project(name="maze", system_prompt="-")  # served under the placeholder name
    service = Service(cfg, {"{project}": project}, FakeEngine())
    service._grouped = True  # an MQTT 5 broker with a share group
    group = f"$share/{cfg.worker.share_group}/"
    shared = [f.replace(group, "$share/{group}/") for f in service._request_filters()]
    control = service._control_topic
    status = service._status
    plain = [f for f in service._control_filters() if f != control]  # cancel and reset: Topics' own
    service._takeover = object()  # takeover on: peers' statuses are read too
    peers = service._peer_filters()
    return {
        *shared,
        *plain,
        *peers,
        status.status_topic,
        status.telemetry_topic,
        control,
        f"{control}/reply",
        PROJECT_TELEMETRY,
    }


def code_topics() -> set[str]:
    project = Topics()
    sessions = {project.user_input("{project}"), project.user_input_sessions("{project}")}
    shared = {"$share/{group}/" + t for t in sessions}
    derived = service_topics()
    # the service's shared filters are Topics' request topics behind the group: nothing built elsewhere
    assert {t for t in derived if t.startswith("$share/")} <= shared, derived
    return topic_builders() | derived


def table_entries(text: str, header: str) -> Counter[str]:
    """The backticked names in the first column of every table whose first header cell is `header`."""
    found: Counter[str] = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        starts_table = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        if not starts_table or _cells(line)[0] != header:
            continue
        for row in itertools.takewhile(lambda r: r.startswith("|"), lines[i + 2 :]):
            found.update(BACKTICKED.findall(_cells(row)[0]))
    return found


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def problems(text: str) -> list[str]:
    """What the doc misses of the code, and what its tables list that the code lacks (empty: honest)."""
    out: list[str] = []
    mentioned = set(BACKTICKED.findall(text))
    for header, code in (("code", {str(c) for c in ErrorCode}), ("field", set(KNOWN_FIELDS))):
        listed = table_entries(text, header)
        out += [f"{header} `{name}` is missing from the `| {header} |` table" for name in sorted(code - set(listed))]
        out += [f"{header} `{name}` is not in the code" for name in sorted(set(listed) - code)]
        out += [f"{header} `{name}` is listed {n} times" for name, n in sorted(listed.items()) if n > 1]
    topics = code_topics()
    out += [f"topic `{topic}` is missing" for topic in sorted(topics - mentioned)]
    out += [f"topic `{topic}` is not built by the code" for topic in sorted(set(table_entries(text, "topic")) - topics)]
    return out


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_the_doc_lists_what_the_code_defines_and_nothing_else(doc):
    assert problems(doc) == []


def test_the_tables_are_found(doc):
    # a renamed header would make the reverse checks vacuous
    assert set(table_entries(doc, "code")) == {str(c) for c in ErrorCode}
    assert set(table_entries(doc, "field")) == KNOWN_FIELDS
    assert "vllm-worker/{workerId}/control/reply" in table_entries(doc, "topic")


@pytest.mark.parametrize(
    ("page", "purpose"), [("protocol.md", "the contract"), ("design.md", "for whoever changes it")]
)
def test_the_first_line_says_what_the_page_is_for(page, purpose):
    first = (DOC.parent / page).read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ")
    assert purpose in first


def _drop_row(text: str, first_cell: str) -> str:
    kept = [line for line in text.splitlines() if not line.startswith(f"| {first_cell} |")]
    assert len(kept) == len(text.splitlines()) - 1, first_cell
    return "\n".join(kept)


def _add_row(text: str, after_first_cell: str, row: str) -> str:
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"| {after_first_cell} |"))
    return "\n".join([*lines[: at + 1], row, *lines[at + 1 :]])


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: _drop_row(t, "`state_unavailable`"), "code `state_unavailable` is missing"),
        (lambda t: _add_row(t, "`expired`", "| `deadlettered` | x | x |"), "code `deadlettered` is not in the code"),
        (lambda t: _add_row(t, "`expired`", "| `expired` | x | x |"), "code `expired` is listed 2 times"),
        (lambda t: _drop_row(t, "`replyTopic`"), "field `replyTopic` is missing"),
        (lambda t: _add_row(t, "`seed`", "| `timeoutMs` | int | x |"), "field `timeoutMs` is not in the code"),
        (
            lambda t: t.replace("`vllm-worker/{workerId}/control/reply`", "`vllm-worker/{workerId}/control/answer`"),
            "topic `vllm-worker/{workerId}/control/reply` is missing",
        ),
        (
            lambda t: _add_row(t, "`{project}/cancel`", "| `{project}/deadletter` | x | 1 | x |"),
            "topic `{project}/deadletter` is not built by the code",
        ),
        (lambda t: t.replace("`$share/{group}/{project}/user_input/+`", "shared"), "topic `$share/{group}/"),
        (lambda t: t.replace("`{project}/response/`", "the v2 prefix"), "topic `{project}/response/` is missing"),
    ],
)
def test_the_check_fails_when_the_doc_drifts(doc, mutate, expected):
    found = problems(mutate(doc))
    assert any(p.startswith(expected) for p in found), found
