"""DESIGN section 2: imports point down. A test walks the imports and fails on an arrow that points up."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "worker"

# module -> worker modules it may import (DESIGN's module map; message is the bus/protocol shared value type)
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "log": {"config"},
    "message": set(),
    "projects": {"config", "errors"},
    "models": {"errors"},
    "engine.base": {"errors"},
    "engine.fake": {"engine.base", "errors"},
    "engine.stats": {"engine.base"},
    "engine.vllm": {"engine.base", "engine.stats", "errors", "config", "quantization", "plan"},
    "plan": {"config", "errors"},
    "checkpoints": {"config", "errors"},
    "quantization": {"config", "errors"},
    "reports": set(),
    "telemetry": {"engine.base", "reports"},
    "payload": set(),
    "schemas": set(),
    "loops": set(),
    "protocol": {"projects", "engine.base", "errors", "message", "payload", "schemas"},
    "admission": {"protocol", "errors", "config", "projects"},
    "sessions": {"protocol", "engine.base", "errors", "config"},
    "replies": {"protocol", "errors"},
    "bus": {"config", "errors", "message"},
    "broker": {"config", "errors"},
    "client": {"bus", "config", "protocol"},
}


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
    bad = []
    for module, allowed in ALLOWED.items():
        path = PKG / (module.replace(".", "/") + ".py")
        bad.extend(f"{module} -> {imported}" for imported in worker_imports(path) if imported not in allowed)
    assert not bad, "imports pointing up or sideways: " + ", ".join(bad)


def test_only_engine_vllm_imports_vllm_and_only_bus_imports_paho():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PKG).as_posix()
        if rel != "engine/vllm.py":
            assert "from vllm" not in text, rel
            assert "import vllm" not in text, rel
        if rel != "bus.py":
            assert "import paho" not in text, rel
            assert "from paho" not in text, rel
