"""Projects: per-topic policy (system prompt, sampling defaults and limits) read from `topics/*.toml`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.config import resolve_path
from worker.errors import ConfigError

PROJECT_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class SamplingDefaults(BaseModel):
    """What a request gets when it does not say; `temperature = 0` means greedy."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    max_tokens: int = Field(256, gt=0)


class SamplingLimits(BaseModel):
    """Hard limits a request's own sampling values are clamped to."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(1024, gt=0)
    max_temperature: float = Field(2.0, ge=0)
    max_stop_sequences: int = Field(8, ge=0)
    max_message_chars: int = Field(32_000, gt=0)


class RateLimit(BaseModel):
    """Token buckets per (project, client) and per project; a None rate is unlimited.

    The project bucket (all clients together) keeps minted client ids from multiplying the budget.
    """

    model_config = ConfigDict(extra="forbid")

    requests_per_s: float | None = Field(None, gt=0)
    burst: int = Field(10, gt=0)
    project_requests_per_s: float | None = Field(None, gt=0)
    project_burst: int = Field(100, gt=0)


class Project(BaseModel):
    """One project's policy, the contents of `topics/{name}.toml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PROJECT_NAME_PATTERN)
    description: str = ""
    system_prompt: str
    strip_reasoning: bool = True
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    limits: SamplingLimits = Field(default_factory=SamplingLimits)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    adapter: str | None = None
    """A PEFT LoRA directory (relative to the checkout, or absolute): this project's requests run with it."""

    def capped(self, max_tokens: int) -> Project:
        """A copy with answer-length default and limit capped worker-wide (the old --max_tokens)."""
        limits = self.limits.model_copy(update={"max_tokens": min(self.limits.max_tokens, max_tokens)})
        defaults = self.defaults.model_copy(update={"max_tokens": min(self.defaults.max_tokens, max_tokens)})
        return self.model_copy(update={"limits": limits, "defaults": defaults})


def load_project(path: Path) -> Project:
    """Parse and validate one project file; the file stem must equal its `name`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        project = Project.model_validate(data)
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"invalid project file {path}: {exc}") from exc
    if project.name != path.stem:
        raise ConfigError(f"project file {path} declares name {project.name!r}; rename one of them")
    return project


def load_projects(topics_dir: str, names: list[str]) -> dict[str, Project]:
    """Load the named projects; an unknown name is a config error listing what exists."""
    directory = resolve_path(topics_dir)
    available = sorted(p.stem for p in directory.glob("*.toml"))
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(
            f"unknown project(s) {', '.join(missing)}: no {directory}/<name>.toml; "
            f"available: {', '.join(available) or 'none'}"
        )
    if not names:
        raise ConfigError("no projects to serve: pass --projects NAME [NAME ...]")
    return {name: load_project(directory / f"{name}.toml") for name in dict.fromkeys(names)}
