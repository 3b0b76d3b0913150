"""The README's `NativeRuntimeConfig` table says what the code does.

Each row names a group, the settings it honours and those it rejects for now. Every
backticked `field="value"` in the honoured column must construct, every one in the
rejected column must raise `InvalidConfigError`; every field named as rejected must be
one the group refuses, and every field the group refuses must be named there.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from sipp import InvalidConfigError, NativeRuntimeConfig

README = Path(__file__).resolve().parents[1] / "README.md"
GROUPS: dict[str, Any] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(NativeRuntimeConfig)
}
_ASSIGNMENT = re.compile(r'^(\w+)="([^"]*)"$')
_NAME = re.compile(r"^\w+$")


def _rows() -> dict[str, tuple[str, str]]:
    """group name -> (honoured cell, rejected cell), from the table under its header."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| group | honoured | rejected for now |")
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names, honoured, rejected = (cell.strip() for cell in line.strip("|").split("|"))
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = (honoured, rejected)
    return rows


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _unsupported(group: str) -> set[str]:
    return set(GROUPS[group]._unsupported)


def test_the_table_covers_every_group() -> None:
    assert set(_rows()) == set(GROUPS)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_honoured_settings_are_accepted(group: str) -> None:
    honoured, _ = _rows()[group]
    cls = GROUPS[group]
    names = {f.name for f in fields(cls)}
    for token in _ticks(honoured):
        if m := _ASSIGNMENT.match(token):
            assert m.group(1) in names, f"{group}: {m.group(1)} is not a field"
            cls(**{m.group(1): m.group(2)})  # raises if the runtime refuses it
        elif _NAME.match(token) and token in names:
            assert token not in _unsupported(group), f"{group}.{token} is listed as honoured"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_rejected_settings_are_refused(group: str) -> None:
    _, rejected = _rows()[group]
    cls = GROUPS[group]
    names = {f.name for f in fields(cls)}
    if "every field" in rejected:
        assert _unsupported(group) == names
        return
    listed: set[str] = set()
    for token in _ticks(rejected):
        if m := _ASSIGNMENT.match(token):
            with pytest.raises(InvalidConfigError):
                cls(**{m.group(1): m.group(2)})
        elif _NAME.match(token):
            assert token in names, f"{group}: {token} is not a field"
            listed.add(token)
    assert listed == _unsupported(group), f"{group}: the rejected column lists {sorted(listed)}"
