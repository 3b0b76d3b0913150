"""The fallback table an operator edits at runtime: each target's `fallbacks` and
`context_fallbacks`, checked by the same rules as `sipp-gateway check` (the targets
exist, none falls back to itself, no chain loops) before any pool takes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from .policy import check_references
from .pool import Pool

__all__ = ["Rules", "apply_rules", "rule_problems"]

Rules = Mapping[str, tuple[Sequence[str], Sequence[str]]]  # target -> (fallbacks, context)


class _Collected:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, rule: str) -> None:
        self.problems.append(f"{path}: {rule}")


def rule_problems(pools: Mapping[str, Pool], rules: Rules) -> list[str]:
    """What is wrong with the whole table once `rules` replace those targets' lists
    (paths are `target.fallbacks[i]`); empty when it may be applied."""
    table = {name: pool.resilience for name, pool in pools.items()}
    collected = _Collected()
    for name, (fallbacks, context) in rules.items():
        if name not in table:
            collected.fail(name, "is not a configured target")
            continue
        table[name] = replace(
            table[name], fallbacks=tuple(fallbacks), context_fallbacks=tuple(context)
        )
    check_references(collected, [(name, name, res) for name, res in table.items()])
    return collected.problems


def apply_rules(pools: Mapping[str, Pool], rules: Rules) -> list[str]:
    """Replace the lists of the targets in `rules` when the resulting table passes the
    checks; otherwise change nothing and return the problems."""
    problems = rule_problems(pools, rules)
    if not problems:
        for name, (fallbacks, context) in rules.items():
            pools[name].set_fallbacks(fallbacks, context)
    return problems
