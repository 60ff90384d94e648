"""Projects: per-topic policy (system prompt, sampling defaults and limits) read from `topics/*.toml`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.config import resolve_path
from worker.errors import ConfigError

PROJECT_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
RESERVED_SUBTREES = frozenset(
    {"user_input", "response", "assistant_response", "cancel", "session", "telemetry", "worker", "capabilities"}
)
"""A project's subtrees with a meaning of their own: a device tool's topic may not sit in one."""


def tool_topic_problem(project: str, topic: str) -> str | None:
    """Why `topic` cannot carry a tool of `project` (None: it can: under `{project}/`, not reserved)."""
    head = f"{project}/"
    if not topic.startswith(head) or len(topic) == len(head) or "+" in topic or "#" in topic:
        return f"a tool topic must be a plain topic under {head}"
    if topic[len(head) :].split("/", 1)[0] in RESERVED_SUBTREES:
        return f"a tool topic may not sit in a reserved subtree ({', '.join(sorted(RESERVED_SUBTREES))})"
    return None


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


class QuotaLimits(BaseModel):
    """Daily budgets per UTC day (`[quota]`); None is unlimited. Tokens are prompt + completion tokens.

    A client (the v2 clientId, else the classic sessionId) or the whole project over its budget is refused
    with `quota_exceeded` until the next UTC midnight; requests already running finish and are counted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_tokens_per_day: int | None = Field(None, ge=0)
    project_tokens_per_day: int | None = Field(None, ge=0)
    client_requests_per_day: int | None = Field(None, ge=0)
    project_requests_per_day: int | None = Field(None, ge=0)


class ProjectTool(BaseModel):
    """A device tool a project declares (`[[tools]]`): the worker calls it on `topic` for the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field("", max_length=2048)
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments (a TOML table)."""
    topic: str = Field(min_length=1, max_length=512)
    """`{project}/...` outside the project's reserved subtrees (checked when the project loads)."""
    timeout_s: float = Field(5.0, gt=0, le=300)


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
    quota: QuotaLimits = Field(default_factory=QuotaLimits)
    adapter: str | None = None
    """A PEFT LoRA directory (relative to the checkout, or absolute): this project's requests run with it."""
    tools: tuple[ProjectTool, ...] = ()
    """Device tools the worker runs for the model (docs/protocol.md section 3b)."""
    capabilities: bool = False
    """Devices may announce tools of their own (`{project}/capabilities/{deviceId}`, retained)."""
    max_tool_rounds: int = Field(4, ge=1, le=16)
    """Device-tool rounds one request may run before it ends with finish reason `tool_rounds`."""

    @property
    def device_tools(self) -> bool:
        """Whether the worker runs device tools for this project (declared, or announced by devices)."""
        return bool(self.tools) or self.capabilities

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
    for tool in project.tools:
        if (problem := tool_topic_problem(project.name, tool.topic)) is not None:
            raise ConfigError(f"project file {path}, tool {tool.name}: {problem}")
    if len({t.name for t in project.tools}) != len(project.tools):
        raise ConfigError(f"project file {path}: tool names must be unique")
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
