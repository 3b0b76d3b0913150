"""The semantic cache's guard: wording that flips meaning is rejected, paraphrases pass."""

from __future__ import annotations

import pytest

from sipp.gateway.cache.calibration import load_pairs
from sipp.gateway.cache.guard import guard_rejects, signals

REJECTED = [
    # (query, cached, rule)
    ("turn on dark mode", "turn off dark mode", "contrast"),
    ("turn on dark mode", "disable dark mode", "contrast"),
    ("enable notifications", "disable notifications", "contrast"),
    ("increase the volume", "decrease the volume", "contrast"),
    ("turn on notifications on my phone", "turn off notifications on my phone", "contrast"),
    ("what's the weather today", "what's the weather tomorrow", "contrast"),
    ("meeting on Monday", "meeting on Tuesday", "contrast"),
    ("turn left at the light", "turn right at the light", "contrast"),
    ("log in to my account", "log out of my account", "contrast"),
    ("who invented the telephone", "when was the telephone invented", "contrast"),
    ("where is the meeting", "why is the meeting", "contrast"),
    ("2 tickets", "3 tickets", "number"),
    ("book two tickets", "book 3 tickets", "number"),
    ("a table for one", "a table", "number"),
    ("the 1st floor", "the 2nd floor", "number"),
    ("the first episode", "the second episode", "number"),
    ("version 1.2", "version 1.3", "number"),
    ("call at 3:30", "call at 4:30", "number"),
    ("twenty five apples", "twenty six apples", "number"),
    ("is the store open", "isn't the store open", "negation"),
    ("is the store open", "is the store not open", "negation"),
    ("it works", "it doesn\u2019t work", "negation"),  # typographic apostrophe
    ("coffee with sugar", "coffee without sugar", "negation"),
    ("my order arrived", "my order never arrived", "negation"),
    ("I can log in", "I cannot log in", "negation"),
    ("I can log in", "I cant log in", "negation"),
]

PASSED = [
    ("turn on dark mode", "enable dark mode"),
    ("turn on dark mode", "switch dark mode on"),
    ("Turn ON dark mode!", "turn on dark mode"),
    ("2 tickets", "two tickets"),
    ("twenty five apples", "25 apples"),
    ("a dozen eggs", "12 eggs"),
    ("the 1st of May", "the first of May"),
    ("one thousand two hundred dollars", "1,200 dollars"),
    ("don't close the window", "do not close the window"),
    ("why isn't it working", "why is it not working"),
    ("how do I reset my password", "I forgot my password, how can I reset it"),
    ("enable dark mode on my phone", "turn on dark mode"),  # the extra "on" is one-sided
    ("lower the screen brightness", "make the screen dimmer"),
    ("who wrote Hamlet", "Hamlet was written by whom"),
    ("what is the height of the Eiffel Tower", "how tall is the Eiffel Tower"),
]


@pytest.mark.parametrize(("query", "cached", "rule"), REJECTED)
def test_meaning_flips_are_rejected_with_their_rule(query: str, cached: str, rule: str) -> None:
    verdict = guard_rejects(query, cached)
    assert verdict is not None and verdict.rule == rule, verdict
    # Symmetric: which side is the cached one does not matter.
    back = guard_rejects(cached, query)
    assert back is not None and back.rule == rule


@pytest.mark.parametrize(("query", "cached"), PASSED)
def test_paraphrases_pass(query: str, cached: str) -> None:
    assert guard_rejects(query, cached) is None
    assert guard_rejects(cached, query) is None


def test_verdicts_name_the_differing_words_and_values() -> None:
    contrast = guard_rejects("turn on dark mode", "turn off dark mode")
    assert contrast is not None and contrast.detail == "'on' vs 'off'"
    number = guard_rejects("2 tickets", "3 tickets")
    assert number is not None and number.detail == "{2} vs {3}"
    negation = guard_rejects("is it open", "isn't it open")
    assert negation is not None and negation.detail == "0 vs 1 negation(s)"


def test_signals_are_reusable_for_many_candidates() -> None:
    query = signals("turn on dark mode")
    assert guard_rejects(query, "turn off dark mode") is not None
    assert guard_rejects(query, "enable dark mode") is None


def test_the_shipped_set_guard_catches_its_targets_and_spares_paraphrases() -> None:
    pairs = load_pairs()
    assert len(pairs) >= 300
    kinds = {p.kind for p in pairs}
    assert {"paraphrase", "negation", "antonym", "number", "entity", "intent"} <= kinds
    for pair in pairs:
        if pair.kind in ("negation", "antonym", "number"):
            assert guard_rejects(pair.query, pair.cached) is not None, pair
    paraphrases = [p for p in pairs if p.kind == "paraphrase"]
    spared = [p for p in paraphrases if guard_rejects(p.query, p.cached) is None]
    # A few paraphrases differ in a number word ("merge two PDFs" / "combine ... into
    # one"); the guard misses those on purpose, so most, not all, pass.
    assert len(spared) >= 0.95 * len(paraphrases)
