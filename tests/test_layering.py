"""The dependency direction in docs/architecture.md, checked on the source (imports parsed, not run)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports, relative imports resolved to absolute names.

    `top_level_only` skips imports inside functions: those run on first call, not
    when the module is imported."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        # Annotation-only imports create no run-time dependency; a function's run only when called.
        type_checking = isinstance(node, ast.If) and ast.unparse(node.test).endswith(
            "TYPE_CHECKING"
        )
        in_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if type_checking or (top_level_only and in_function):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module:
                found.add(target)
            else:  # `from .. import x`: x is a module of that package (whose __init__
                # runs for any import from inside it anyway)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def _sipp_imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every `sipp...` module `path` imports."""
    return {m for m in _imports(path, top_level_only=top_level_only) if m.split(".")[0] == "sipp"}


MODULES = {_module(p): p for p in (SRC / "sipp").rglob("*.py")}


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _within_any(names: set[str], *prefixes: str) -> bool:
    return any(_within(n, *prefixes) for n in names)


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if _within(n, "sipp._types", "sipp._errors", "sipp.protocol"))
)
def test_core_layers_import_only_each_other(name: str) -> None:
    allowed = ("sipp._types", "sipp._errors", "sipp.protocol")
    bad = {m for m in _sipp_imports(MODULES[name]) if not _within(m, *allowed)}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if _within(n, "sipp.local", "sipp.remote"))
)
def test_local_and_remote_stay_apart(name: str) -> None:
    other = "sipp.remote" if _within(name, "sipp.local") else "sipp.local"
    bad = {
        m
        for m in _sipp_imports(MODULES[name])
        if _within(m, other, "sipp.gateway", "sipp._client", "sipp.cli")
    }
    assert not bad, f"{name} imports {sorted(bad)}"


def test_only_the_cli_imports_the_gateway() -> None:
    for name, path in MODULES.items():
        if _within(name, "sipp.gateway", "sipp.cli"):
            continue
        bad = {m for m in _sipp_imports(path) if _within(m, "sipp.gateway")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_only_the_llama_wrappers_import_llama_cpp() -> None:
    """`_llama` for llama.cpp itself, its sibling `_mtmd` for the multimodal library."""
    importers = {name for name, path in MODULES.items() if _within_any(_imports(path), "llama_cpp")}
    assert importers == {"sipp.local._llama", "sipp.local._mtmd"}


def test_nothing_outside_local_loads_it_at_import_time() -> None:
    for name, path in MODULES.items():
        if _within(name, "sipp.local"):
            continue
        bad = {m for m in _sipp_imports(path, top_level_only=True) if _within(m, "sipp.local")}
        assert not bad, f"{name} imports {sorted(bad)} when it is imported"


def test_importing_sipp_does_not_load_llama_cpp() -> None:
    # The parsed rule above, observed: a client that only talks HTTP never loads llama.cpp.
    code = "import sys, sipp, sipp.protocol; print('llama_cpp' in sys.modules)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_the_resolver_sees_imports() -> None:
    # Guards the guard: a known edge must be found, or every test above passes vacuously.
    assert "sipp.protocol.codec" in _sipp_imports(MODULES["sipp.protocol.streaming"])
    assert "sipp._types" in _sipp_imports(MODULES["sipp.protocol.streaming"])
    assert "sipp.local._llama" in _sipp_imports(MODULES["sipp.local.endpoint"])
    assert "sipp.local.endpoint" in _sipp_imports(MODULES["sipp._client"])
    assert "sipp.local.endpoint" not in _sipp_imports(MODULES["sipp._client"], top_level_only=True)
    assert "llama_cpp" in _imports(MODULES["sipp.local._llama"])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, "sipp.gateway.formats")))
def test_gateway_formats_know_no_policy(name: str) -> None:
    allowed = (
        "sipp._types",
        "sipp._errors",
        "sipp.protocol",
        "sipp.gateway.request",
        "sipp.gateway.config",
        "sipp.gateway.formats",
    )
    bad = {m for m in _sipp_imports(MODULES[name]) if not _within(m, *allowed)}
    assert not bad, f"{name} imports {sorted(bad)}"
