"""Which chat template and tool-call parser a model uses for tools (`model.chat_template`, `tool_call_parser`).

`tool_call_parser = "auto"` reads the model's own template: one that writes `<tool_call>` blocks (Qwen,
Hermes) is read back with vLLM's `hermes` parser; a ChatML template without tools (the demo model's)
gets the shipped `templates/chatml_tools.jinja` and `hermes`; anything else has no tool support until
both settings name one (tools are then refused with a typed error, never silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent / "templates"
CHATML_TOOLS = TEMPLATES / "chatml_tools.jinja"


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """The template to render with (None: the model's own) and the vLLM tool parser (None: no tools)."""

    template: str | None
    parser: str | None


def tool_format(own_template: str | None, chat_template: str | None, tool_call_parser: str | None) -> ToolFormat:
    """Resolve the settings against the model's own template (see the module docstring)."""
    template = _read(chat_template) if chat_template else None
    if tool_call_parser != "auto":
        return ToolFormat(template, tool_call_parser)
    text = template or own_template or ""
    if "<tool_call>" in text:
        return ToolFormat(template, "hermes")
    if template is None and "<|im_start|>" in text and "tools" not in text:
        return ToolFormat(CHATML_TOOLS.read_text(encoding="utf-8"), "hermes")
    return ToolFormat(template, None)


def _read(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read model.chat_template {path}: {exc}") from exc
