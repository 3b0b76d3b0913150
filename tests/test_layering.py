"""The dependency direction DESIGN.md sets, checked on the source (imports parsed, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sipp_imports(path: Path) -> set[str]:
    """Every `sipp...` module `path` imports, relative imports resolved."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # annotation-only imports create no run-time dependency
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sipp"}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.split(".")[0] != "sipp":
                continue
            found.add(target)
            if not node.module:  # `from . import x`: x is a module of that package
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


MODULES = {_module(p): p for p in (SRC / "sipp").rglob("*.py")}


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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


def test_the_resolver_sees_imports() -> None:
    # Guards the guard: a known edge must be found, or every test above passes vacuously.
    assert "sipp.protocol.codec" in _sipp_imports(MODULES["sipp.protocol.streaming"])
    assert "sipp._types" in _sipp_imports(MODULES["sipp.protocol.streaming"])
    assert "sipp.local._llama" in _sipp_imports(MODULES["sipp.local.endpoint"])
