"""Shared fixtures (see support.py for the helpers tests import)."""

from __future__ import annotations

import pytest

from worker.projects import Project, load_projects

ALL_PROJECTS = ["maze", "driving", "bloodcell", "racing", "general"]


@pytest.fixture(scope="session")
def projects() -> dict[str, Project]:
    return load_projects("topics", ALL_PROJECTS)
