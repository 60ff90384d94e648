"""Shared fixtures (see support.py for the helpers tests import)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import Mosquitto

from worker.projects import Project, load_projects

ALL_PROJECTS = ["maze", "driving", "bloodcell", "racing", "general"]


@pytest.fixture(scope="session")
def projects() -> dict[str, Project]:
    return load_projects("topics", ALL_PROJECTS)


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A throw-away Mosquitto (files that need persistence define their own)."""
    broker = Mosquitto().start()
    yield broker
    broker.stop()
