"""DESIGN section 2: imports point down. A test walks the imports and fails on an arrow that points up."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "worker"

# module -> worker modules it may import (DESIGN's module map; message is the bus/protocol shared value type).
# Every module of worker/ must be listed: a new module states where it sits before it can land.
PROTOCOL = {"protocol", "protocol.topics", "protocol.messages", "protocol.parse", "protocol.encode"}
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "__main__": {"cli"},
    "errors": set(),
    "message": set(),
    "reports": set(),
    "loops": set(),
    "config": {"errors"},
    "log": {"config"},
    "projects": {"config", "errors"},
    "models": {"errors"},
    "parallel": {"errors"},
    "plan": {"adapters", "config", "errors", "parallel"},
    "checkpoints": {"config", "errors", "models"},
    "quantization": {"config", "errors"},
    "protocol.topics": {"message"},
    "protocol.payload": {"message"},
    "protocol.schemas": set(),
    "protocol.messages": {"errors", "projects", "protocol.topics"},
    "protocol.encode": {"errors", "projects", "protocol.messages"},
    "protocol.parse": {
        "errors",
        "message",
        "projects",
        "protocol.messages",
        "protocol.payload",
        "protocol.schemas",
        "protocol.topics",
    },
    "protocol": {"protocol.encode", "protocol.messages", "protocol.parse", "protocol.topics"},
    "engine": set(),
    "adapters": {"errors"},
    "control": {"adapters", "engine.base", "errors", "protocol", "protocol.payload"},
    "engine.base": {"adapters", "protocol.messages"},
    "engine.fake": {"adapters", "engine.base", "errors", "protocol.messages"},
    "engine.stats": {"engine.base"},
    "engine.vllm": {
        "engine.base",
        "engine.stats",
        "errors",
        "config",
        "quantization",
        "parallel",
        "plan",
        "protocol.messages",
        "adapters",
    },
    "telemetry": {"engine.base", "reports"},
    "state.base": {"protocol"},
    "state.memory": {"errors", "protocol", "state.base"},
    "state.scripts": set(),
    "state.codec": {"protocol", "state.base"},
    "state.redis_backend": {"errors", "protocol", "state", "state.base", "state.codec", "state.memory"},
    "state": {"config", "state.base", "state.memory", "state.redis_backend"},
    "admission": {"protocol", "errors", "config", "projects", "state"},
    "sessions": {"protocol", "engine.base", "errors", "config", "state", "state.base", "state.memory"},
    "replies": {"protocol", "protocol.encode", "errors"},
    "jobs": {"protocol", "errors", "message"},
    "serve": {"adapters", "engine.base", "errors", "jobs", "protocol", "replies", "sessions", "state", "state.base"},
    "takeover": {"bus", "config", "intake", "jobs", "message", "state"},
    "intake": {
        "admission",
        "control",
        "errors",
        "jobs",
        "message",
        "projects",
        "protocol",
        "replies",
        "serve",
        "sessions",
        "state",
    },
    "packets": set(),
    "pahoio": {"packets"},
    "eventloop": {"errors"},
    "mqttclient": {"config", "pahoio"},
    "bus": {"config", "errors", "message", "mqttclient", "pahoio"},
    "broker": {"config", "errors"},
    "status": {"adapters", "bus", "config", "engine.base", "errors", "reports", "sessions", "state", "telemetry"},
    "service": {
        "adapters",
        "control",
        "admission",
        "broker",
        "bus",
        "config",
        "engine.base",
        "engine.vllm",
        "errors",
        "intake",
        "jobs",
        "loops",
        "message",
        "mqttclient",
        "packets",
        "projects",
        "protocol",
        "protocol.parse",
        "replies",
        "reports",
        "serve",
        "sessions",
        "state",
        "status",
        "takeover",
    },
    "client": {"bus", "config", "protocol"},
    "fleet": {"reports"},
    "supervisor": {"broker", "config", "errors", "parallel", "plan", "telemetry"},
    "terminal": set(),
    "console": set(),
    "console.samples": {"fleet"},
    "console.server": {"client", "console.samples", "protocol"},
    "commands": {
        "bus",
        "client",
        "config",
        "console.samples",
        "console.server",
        "errors",
        "fleet",
        "log",
        "parallel",
        "plan",
        "terminal",
    },
    "tools": set(),
    "tools.autoround_quantize": set(),
    "tools.train_adapter": set(),
    "cli": {
        "adapters",
        "checkpoints",
        "commands",
        "config",
        "engine.fake",
        "engine.vllm",
        "errors",
        "eventloop",
        "log",
        "models",
        "projects",
        "service",
        "supervisor",
        "terminal",
    },
}


def module_name(path: Path) -> str:
    name = path.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
    return name.removesuffix(".__init__")


def worker_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
            base = node.module.removeprefix("worker").lstrip(".")
            names = [base] if base else [a.name for a in node.names]
            found.update(n for n in names if n and n != "__version__")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("worker.") for a in node.names if a.name.startswith("worker."))
    return found


def test_imports_point_down():
    bad, unlisted = [], []
    for path in sorted(PKG.rglob("*.py")):
        module = module_name(path)
        if module not in ALLOWED:
            unlisted.append(module)
            continue
        bad.extend(f"{module} -> {imported}" for imported in worker_imports(path) if imported not in ALLOWED[module])
    assert not unlisted, "modules missing from the layer map: " + ", ".join(unlisted)
    assert not bad, "imports pointing up or sideways: " + ", ".join(bad)


def test_the_wire_format_does_not_depend_on_the_engine():
    for path in (PKG / "protocol").rglob("*.py"):
        assert not {i for i in worker_imports(path) if i.startswith("engine")}, path


def test_only_engine_vllm_imports_vllm_and_only_bus_imports_paho():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PKG).as_posix()
        if rel != "engine/vllm.py":
            assert "from vllm" not in text, rel
            assert "import vllm" not in text, rel
        if rel not in ("bus.py", "pahoio.py", "mqttclient.py"):
            assert "import paho" not in text, rel
            assert "from paho" not in text, rel
