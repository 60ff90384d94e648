"""Shared fixtures (see support.py for the helpers tests import)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import Mosquitto, RedisServer

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


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A throw-away redis-server (modules that share one across their tests define their own)."""
    server = RedisServer().start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long fuzz run only when asked for by marker (`pytest -m fuzz`): `make test` runs its short profile."""
    if "fuzz" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the long fuzz run: pytest -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
