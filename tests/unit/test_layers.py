"""docs/design.md section 2: imports point down, between packages and between modules.

A test walks the imports and fails on an arrow that points up, on a package cycle, and on a module that
has not said where it sits.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "worker"

# Package (or top-level module) -> what it may import besides itself. `core` is the top-level modules
# everything may use (errors, message, loops, config, log, projects). The order is the architecture:
# the wire format and the transport know nothing above them; the engine knows the wire's chat types;
# serving joins them; fleet reports on serving; service wires it all; the faces sit on top.
CORE = {"errors", "message", "loops", "config", "log", "projects"}
PACKAGES: dict[str, set[str]] = {
    "core": set(),
    "protocol": {"core"},
    "transport": {"core"},
    "engine": {"core", "protocol"},
    "state": {"core", "protocol"},
    "serving": {"core", "protocol", "transport", "engine", "state"},
    "fleet": {"core", "transport", "engine", "state", "serving"},
    "client": {"core", "protocol", "transport"},
    "service": {"core", "protocol", "transport", "engine", "state", "serving", "fleet"},
    "console": {"core", "protocol", "state", "client", "fleet"},
    "cli": {"core", "transport", "engine", "state", "fleet", "client", "console", "service"},
    "tools": set(),
    "__main__": {"cli"},
    "__init__": set(),
}

# module -> worker modules it may import (the module map of docs/design.md; message is the value type the
# transport and the wire format share). Every module of worker/ must be listed: a new module states where
# it sits before it can land.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "__main__": {"cli", "cli.main"},  # `from worker.cli import main`: the function, named like its module
    # core
    "errors": set(),
    "message": set(),
    "loops": set(),
    "config": {"errors"},
    "log": {"config"},
    "projects": {"config", "errors"},
    # the wire format
    "protocol": {"protocol.encode", "protocol.messages", "protocol.parse", "protocol.topics"},
    "protocol.topics": {"message", "projects"},
    "protocol.payload": {"message"},
    "protocol.schemas": set(),
    "protocol.tools": {"errors", "protocol.schemas", "protocol.topics"},
    "protocol.chat": {"errors", "protocol.messages", "protocol.tools", "protocol.topics"},
    "protocol.messages": {"errors", "projects", "protocol.tools", "protocol.topics"},
    "protocol.encode": {"errors", "projects", "protocol.messages"},
    "protocol.parse": {
        "errors",
        "message",
        "projects",
        "protocol.chat",
        "protocol.messages",
        "protocol.payload",
        "protocol.schemas",
        "protocol.tools",
        "protocol.topics",
    },
    # transport
    "transport": set(),
    "transport.packets": set(),
    "transport.pahoclient": {"transport.packets"},
    "transport.pahoio": {"transport.pahoclient"},
    "transport.eventloop": {"errors"},
    "transport.mqttclient": {"config", "transport.pahoclient"},
    "transport.connect": {"config", "errors", "transport.pahoio"},
    "transport.bus": {
        "config",
        "errors",
        "message",
        "transport.connect",
        "transport.mqttclient",
        "transport.pahoclient",
        "transport.pahoio",
    },
    "transport.broker": {"config", "errors"},
    # the engine and its pre-flight
    "engine": set(),
    "engine.adapters": {"errors"},
    "engine.models": {"errors"},
    "engine.parallel": {"errors"},
    "engine.quantization": {"config", "errors"},
    "engine.checkpoints": {"config", "errors", "engine.models"},
    "engine.plan": {"config", "engine.adapters", "engine.parallel", "errors"},
    "engine.base": {"engine.adapters", "protocol.messages", "protocol.tools"},
    "engine.fake": {"engine.adapters", "engine.base", "errors", "protocol.messages", "protocol.tools"},
    "engine.stats": {"engine.base"},
    "engine.chat_templates": {"errors"},
    "engine.cpu_dtype": {"engine.plan"},
    "engine.vllm_parsing": {"engine.base", "errors", "protocol.tools"},
    "engine.vllm_preflight": {
        "config",
        "engine.cpu_dtype",
        "engine.parallel",
        "engine.plan",
        "engine.quantization",
        "errors",
    },
    "engine.vllm": {
        "config",
        "engine.adapters",
        "engine.base",
        "engine.chat_templates",
        "engine.cpu_dtype",
        "engine.parallel",
        "engine.quantization",
        "engine.stats",
        "engine.vllm_parsing",
        "engine.vllm_preflight",
        "errors",
        "protocol.messages",
        "protocol.tools",
    },
    # state
    "state": {"config", "state.base", "state.memory", "state.redis_backend", "state.usage"},
    "state.base": {"protocol", "protocol.tools", "state.usage"},
    "state.usage": {"errors"},
    "state.memory": {"errors", "protocol", "state.base", "state.usage"},
    "state.redis_usage": {"errors", "state.redis_link", "state.scripts", "state.usage"},
    "state.scripts": set(),
    "state.codec": {"protocol", "protocol.tools", "state.base"},
    "state.redis_link": {"errors", "state.base", "state.codec", "state.scripts"},
    "state.redis_backend": {
        "errors",
        "protocol",
        "state",
        "state.base",
        "state.codec",
        "state.memory",
        "state.redis_link",
        "state.redis_usage",
        "state.scripts",
        "state.usage",
    },
    # the request path
    "serving": set(),
    "serving.admission": {"config", "errors", "projects", "protocol", "state", "state.usage"},
    "serving.sessions": {
        "config",
        "engine.base",
        "errors",
        "protocol",
        "protocol.tools",
        "state",
        "state.base",
        "state.memory",
    },
    "serving.replies": {"errors", "protocol", "protocol.encode", "protocol.tools", "serving.accounting"},
    "serving.accounting": {"errors", "protocol", "serving.admission", "state"},
    "serving.jobs": {"errors", "message", "protocol"},
    "serving.serve": {
        "engine.adapters",
        "engine.base",
        "errors",
        "protocol",
        "protocol.tools",
        "serving.devices",
        "serving.generation",
        "serving.jobs",
        "serving.pipeline",
        "serving.replies",
        "serving.accounting",
        "serving.rounds",
        "serving.sessions",
        "state",
        "state.base",
    },
    "serving.control": {"engine.adapters", "engine.base", "errors", "protocol", "protocol.payload"},
    "serving.intake": {
        "errors",
        "message",
        "projects",
        "protocol",
        "serving.admission",
        "serving.control",
        "serving.jobs",
        "serving.pipeline",
        "serving.replies",
        "serving.serve",
        "serving.sessions",
        "state",
    },
    "serving.affinity": {"config", "engine.base", "protocol"},
    "serving.devices": {
        "errors",
        "message",
        "projects",
        "protocol",
        "protocol.payload",
        "protocol.tools",
    },
    "serving.rounds": {"engine.base", "errors", "protocol", "protocol.tools", "serving.devices", "serving.replies"},
    "serving.pipeline": {
        "engine.adapters",
        "engine.base",
        "protocol",
        "serving.devices",
        "serving.replies",
        "serving.sessions",
        "state",
    },
    "serving.generation": {
        "engine.adapters",
        "engine.base",
        "protocol",
        "protocol.tools",
        "serving.pipeline",
        "serving.replies",
    },
    "serving.takeover": {"config", "message", "serving.intake", "serving.jobs", "state", "transport.bus"},
    # the fleet
    "fleet": set(),
    "fleet.reports": set(),
    "fleet.telemetry": {"engine.base", "fleet.reports"},
    "fleet.status": {
        "config",
        "engine.adapters",
        "engine.base",
        "errors",
        "fleet.homeassistant",
        "fleet.reports",
        "fleet.telemetry",
        "serving.sessions",
        "state",
        "state.usage",
        "transport.bus",
    },
    "fleet.view": {"fleet.reports"},
    "fleet.homeassistant": set(),
    "fleet.supervisor": {
        "config",
        "engine.parallel",
        "engine.plan",
        "errors",
        "fleet.telemetry",
        "transport.broker",
    },
    # wiring and faces
    "service": {
        "config",
        "engine.adapters",
        "engine.base",
        "engine.vllm",
        "engine.vllm_preflight",
        "errors",
        "fleet.reports",
        "fleet.status",
        "loops",
        "message",
        "projects",
        "protocol",
        "protocol.parse",
        "serving.admission",
        "serving.affinity",
        "serving.control",
        "serving.devices",
        "serving.intake",
        "serving.jobs",
        "serving.pipeline",
        "serving.replies",
        "serving.serve",
        "serving.sessions",
        "serving.takeover",
        "state",
        "transport.broker",
        "transport.bus",
        "transport.mqttclient",
        "transport.packets",
    },
    "client": {"client.workers", "config", "protocol", "transport.bus"},
    "client.workers": {"transport.bus"},
    "console": set(),
    "console.samples": {"fleet.view"},
    "console.server": {"client", "console.samples", "console.usage", "protocol"},
    "console.usage": {"errors", "fleet.view", "state", "state.usage"},
    "cli": {"cli.main"},
    "cli.terminal": set(),
    "cli.listen": {"transport.bus"},
    "cli.retire": {"cli.listen", "cli.terminal", "config", "fleet.homeassistant", "transport.bus"},
    "cli.usage": {
        "cli.listen",
        "cli.terminal",
        "config",
        "errors",
        "fleet.reports",
        "projects",
        "state",
        "state.usage",
        "transport.bus",
    },
    "cli.commands": {
        "cli.retire",
        "cli.terminal",
        "cli.usage",
        "client",
        "config",
        "engine.parallel",
        "engine.plan",
        "errors",
        "fleet.view",
        "log",
        "transport.bus",
    },
    "cli.console_command": {
        "cli.commands",
        "cli.terminal",
        "client",
        "config",
        "console.samples",
        "console.server",
        "console.usage",
        "fleet.view",
        "state",
    },
    "cli.main": {
        "cli.commands",
        "cli.console_command",
        "cli.terminal",
        "config",
        "engine.adapters",
        "engine.checkpoints",
        "engine.fake",
        "engine.models",
        "engine.vllm",
        "errors",
        "fleet.supervisor",
        "log",
        "projects",
        "service",
        "transport.eventloop",
    },
    "tools": set(),
    "tools.autoround_quantize": set(),
    "tools.train_adapter": set(),
}


def module_name(path: Path) -> str:
    name = path.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
    return name.removesuffix(".__init__")


def package_of(module: str) -> str:
    top = module.split(".", maxsplit=1)[0]
    return "core" if top in CORE else top


def worker_imports(path: Path) -> set[str]:
    """The worker modules a file imports; `from worker.engine import adapters` counts as engine.adapters."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
            base = node.module.removeprefix("worker").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                if name in ALLOWED:
                    found.add(name)
                elif base:
                    found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("worker.") for a in node.names if a.name.startswith("worker."))
    return found


def all_imports() -> dict[str, set[str]]:
    return {module_name(p): worker_imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_says_where_it_sits():
    unlisted = sorted(set(all_imports()) - set(ALLOWED))
    assert not unlisted, "modules missing from the layer map: " + ", ".join(unlisted)
    stale = sorted(set(ALLOWED) - set(all_imports()))
    assert not stale, "layer map lists modules that do not exist: " + ", ".join(stale)


def test_imports_point_down():
    bad = [
        f"{module} -> {imported}"
        for module, imports in all_imports().items()
        for imported in imports
        if module in ALLOWED and imported not in ALLOWED[module]
    ]
    assert not bad, "imports pointing up or sideways: " + ", ".join(bad)


def test_module_map_agrees_with_the_package_map():
    """The module map may not allow what the package map forbids, so the two cannot drift apart."""
    bad = [
        f"{module} -> {imported}"
        for module, allowed in ALLOWED.items()
        for imported in allowed
        if package_of(imported) != package_of(module) and package_of(imported) not in PACKAGES[package_of(module)]
    ]
    assert not bad, "module map crosses packages the wrong way: " + ", ".join(bad)


def test_packages_have_no_cycles():
    graph = {pkg: {p for p in allowed if p != pkg} for pkg, allowed in PACKAGES.items()}
    done: set[str] = set()

    def visit(pkg: str, path: tuple[str, ...]) -> None:
        assert pkg not in path, "package cycle: " + " -> ".join((*path, pkg))
        if pkg in done:
            return
        for nxt in graph[pkg]:
            visit(nxt, (*path, pkg))
        done.add(pkg)

    for pkg in graph:
        visit(pkg, ())
    assert set(graph) >= {package_of(m) for m in ALLOWED}, "a package is missing from PACKAGES"


def test_the_wire_format_does_not_depend_on_the_engine():
    for path in (PKG / "protocol").rglob("*.py"):
        assert not {i for i in worker_imports(path) if i.startswith("engine")}, path


def test_only_the_vllm_engine_imports_vllm_and_only_the_transport_imports_paho():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PKG).as_posix()
        if rel not in ("engine/vllm.py", "engine/vllm_parsing.py", "engine/vllm_preflight.py"):
            assert "from vllm" not in text, rel
            assert "import vllm" not in text, rel
        if rel not in (
            "transport/bus.py",
            "transport/connect.py",
            "transport/pahoclient.py",
            "transport/pahoio.py",
            "transport/mqttclient.py",
        ):
            assert "import paho" not in text, rel
            assert "from paho" not in text, rel


def test_the_design_doc_maps_every_module():
    """docs/design.md's module map names every module (as `pkg/mod.py`, or `mod` in its package's row)."""
    design = (PKG.parent / "docs" / "design.md").read_text()
    missing = []
    for module in ALLOWED:
        if module in {"__init__", "__main__"} or ("." not in module and module in PACKAGES):
            continue
        pkg, _, leaf = module.rpartition(".")
        names = (f"`{pkg}/{leaf}.py`", f"`{leaf}`") if pkg else (f"`{leaf}.py`",)
        if not any(name in design for name in names):
            missing.append(module)
    assert not missing, "docs/design.md does not map: " + ", ".join(missing)
    for pkg in set(PACKAGES) - {"core", "__main__", "__init__", "service", "client"}:
        assert f"`{pkg}/`" in design, pkg
