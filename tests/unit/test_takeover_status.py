"""A peer's status is broker data: what the takeover keeps of it is bounded in bytes, and reading never raises."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.serving.takeover import MAX_NAME_CHARS, MAX_PROJECTS, _status


def test_a_huge_project_list_is_cut_to_bounded_names():
    payload = json.dumps({"state": "offline", "projects": ["p" * 1000] + [f"p{i}" for i in range(5000)]}).encode()
    state, projects = _status(payload) or ("", frozenset())
    assert state == "offline"
    assert len(projects) <= MAX_PROJECTS
    assert all(len(p) <= MAX_NAME_CHARS for p in projects)


@settings(max_examples=200, derandomize=True)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_read_as_a_status_never_raise(payload):
    result = _status(payload)
    assert result is None or sum(len(p) for p in result[1]) <= MAX_PROJECTS * MAX_NAME_CHARS
