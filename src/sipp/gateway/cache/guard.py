"""The semantic cache's guard: reject a near neighbour whose wording flips the meaning.

Sentence embeddings score "turn on dark mode" and "turn off dark mode" above 0.95
with all-MiniLM-L6-v2: no similarity threshold separates them from paraphrases.
Before a semantic hit is served, `guard_rejects(query, candidate)` compares the two
texts on three cheap, explainable signals and returns the reason when they differ:

* **negation**: how many negation markers each has ("not", "no", "never", "without",
  any "n't" contraction, "dont"-style spellings). "is" vs "isn't" differ; "don't" vs
  "do not" do not.
* **number**: the multiset of numbers, digits and number words alike ("2 tickets" vs
  "3 tickets" differ; "2 tickets" vs "two tickets" do not; "1st" and "first" are one
  ordinal). "one" counts as a number, so "which one" vs "which" is rejected: the
  guard errs towards a miss, which costs an upstream call, never a wrong answer.
* **contrast**: small sets of mutually exclusive words (on/enable/start vs
  off/disable/stop, increase/raise/more vs decrease/lower/less, add vs remove, today
  vs tomorrow vs yesterday, weekdays, months, who vs when vs where vs why, ...). After
  cancelling the words the two texts share, if one keeps a word of one side and the
  other a word of another side of the same set, the candidate is rejected. "turn on dark mode" vs "enable dark mode"
  pass (same side); "turn on notifications on my phone" vs "turn off notifications on
  my phone" do not (the shared "on" cancels, "on" vs "off" remains).

What it does not catch: changed entities ("weather in Paris" vs "in London") and
different intents; those are the threshold's job, measured by
`sipp-gateway cache calibrate`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

__all__ = ["GuardVerdict", "guard_rejects", "signals"]

_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*(?:st|nd|rd|th)?|[a-z]+(?:'[a-z]+)?")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})

_NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "nowhere",
        "neither",
        "nor",
        "without",
        "cannot",
        "dont",
        "doesnt",
        "didnt",
        "isnt",
        "arent",
        "wasnt",
        "werent",
        "wont",
        "cant",
        "couldnt",
        "shouldnt",
        "wouldnt",
        "havent",
        "hasnt",
        "hadnt",
        "mustnt",
        "neednt",
        "aint",
    ]
)

_UNITS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(
        ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2
    )
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
_ORDINALS = {
    w: i
    for i, w in enumerate(
        [
            "first",
            "second",
            "third",
            "fourth",
            "fifth",
            "sixth",
            "seventh",
            "eighth",
            "ninth",
            "tenth",
            "eleventh",
            "twelfth",
        ],
        1,
    )
}
_MISC_NUMBERS = {"dozen": 12, "half": 0.5, "twice": 2, "double": 2, "triple": 3}


def _forms(*words: str) -> frozenset[str]:
    """Each word with its regular inflections (enable -> enables, enabled, enabling); the
    odd non-word this makes of an adjective ("mored") never occurs in text, so costs nothing."""
    out: set[str] = set()
    for word in words:
        out.add(word)
        if " " in word or not word.isalpha() or len(word) < 3:
            continue
        stem = word[:-1] if word.endswith("e") else word
        out.update({word + "s", stem + "ed", stem + "ing"})
        if word.endswith("e"):
            out.add(word + "d")
    return frozenset(out)


# Each set: sides of one contrast; a word belongs to one side of one set at most.
_CONTRASTS: tuple[tuple[frozenset[str], ...], ...] = (
    (
        _forms("on", "enable", "activate", "start", "begin", "resume", "unmute", "unpause"),
        _forms("off", "disable", "deactivate", "stop", "end", "pause", "mute", "halt"),
    ),
    (_forms("open"), _forms("close", "shut")),
    (
        _forms("show", "shown", "unhide", "display", "visible"),
        _forms("hide", "hidden", "invisible"),
    ),
    (
        _forms("increase", "raise", "more", "higher", "up", "louder", "brighter", "faster")
        | _forms("bigger", "larger", "maximize", "expand", "grow", "boost", "longer", "warmer"),
        _forms("decrease", "reduce", "less", "fewer", "lower", "down", "quieter", "dimmer")
        | _forms("slower", "smaller", "minimize", "shrink", "cut", "shorter", "cooler", "dim"),
    ),
    (
        _forms("add", "insert", "include", "create", "attach", "append", "subscribe", "install"),
        _forms(
            "remove", "delete", "exclude", "erase", "detach", "unsubscribe", "uninstall", "drop"
        ),
    ),
    (
        _forms("allow", "permit", "accept", "approve", "grant"),
        _forms("deny", "reject", "block", "refuse", "decline", "forbid", "revoke"),
    ),
    (_forms("lock", "locked"), _forms("unlock", "unlocked")),
    (_forms("buy", "bought", "purchase"), _forms("sell", "sold")),
    (
        _forms("import", "upload", "push", "send", "sent"),
        _forms("export", "download", "pull", "receive"),
    ),
    (_forms("login", "signin", "in"), _forms("logout", "signout", "out")),
    (_forms("arrive", "arrival", "arrivals"), _forms("depart", "departure", "departures", "leave")),
    (
        _forms("before", "earlier", "early", "ago", "past"),
        _forms("after", "later", "late", "future"),
    ),
    (_forms("above", "over", "upstairs"), _forms("below", "under", "downstairs")),
    (_forms("hot", "hotter", "warm"), _forms("cold", "colder", "cool", "freezing")),
    (
        _forms("cheap", "cheaper", "cheapest", "inexpensive"),
        _forms("expensive", "pricier", "priciest", "costly"),
    ),
    (_forms("best", "better"), _forms("worst", "worse")),
    (_forms("win", "won", "winning", "gain", "profit"), _forms("lose", "lost", "losing", "loss")),
    (_forms("true", "correct"), _forms("false", "wrong", "incorrect")),
    (_forms("yes"), _forms("nope")),
    (_forms("max", "maximum", "most"), _forms("min", "minimum", "least")),
    (_forms("first", "oldest", "earliest"), _forms("last", "newest", "latest")),
    (_forms("encrypt"), _forms("decrypt")),
    (_forms("connect", "online"), _forms("disconnect", "offline")),
    (_forms("inside", "indoor", "indoors"), _forms("outside", "outdoor", "outdoors")),
    (_forms("left"), _forms("right")),
    (
        _forms("north", "northern"),
        _forms("south", "southern"),
        _forms("east", "eastern"),
        _forms("west", "western"),
    ),
    (_forms("celsius"), _forms("fahrenheit"), _forms("kelvin")),
    (_forms("today", "tonight"), _forms("tomorrow"), _forms("yesterday")),
    (_forms("morning"), _forms("afternoon"), _forms("evening"), _forms("night")),
    tuple(
        frozenset({day, day + "s"})
        for day in ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    ),
    tuple(
        frozenset({m})
        for m in [
            "january",
            "february",
            "march",
            "april",
            "june",
            "july",
            "august",
            "september",
            "october",
            "november",
            "december",
        ]
    ),
    (
        frozenset({"daily", "day", "days"}),
        frozenset({"weekly", "week", "weeks"}),
        frozenset({"monthly", "month", "months"}),
        frozenset({"yearly", "annual", "annually", "year", "years"}),
        frozenset({"hourly", "hour", "hours"}),
        frozenset({"minute", "minutes"}),
    ),
    (
        frozenset({"man", "men", "male", "boy", "boys", "he", "him", "his"}),
        frozenset({"woman", "women", "female", "girl", "girls", "she", "her", "hers"}),
    ),
    (frozenset({"and"}), frozenset({"or"})),
    (frozenset({"am"}), frozenset({"pm"})),
    # Questions about another thing ("who invented the telephone" / "when was the
    # telephone invented"). Not what/which/how: "what is the height" = "how tall".
    (
        frozenset({"who", "whom", "whose"}),
        frozenset({"when"}),
        frozenset({"where"}),
        frozenset({"why"}),
    ),
    (frozenset({"plus", "sum"}), frozenset({"minus", "subtract", "difference"})),
)


def _side_index() -> dict[str, tuple[int, int]]:
    index: dict[str, tuple[int, int]] = {}
    for set_no, sides in enumerate(_CONTRASTS):
        for side_no, words in enumerate(sides):
            for word in words:
                # A word on two sides would contradict itself; the first claim wins.
                index.setdefault(word, (set_no, side_no))
    return index


_SIDES = _side_index()


@dataclass(frozen=True)
class Signals:
    """What the guard compares, extracted once per text."""

    negations: int
    numbers: Counter[str]
    contrasts: Counter[tuple[int, int]]
    contrast_words: dict[tuple[int, int], str]  # a word seen for each side, for the verdict


@dataclass(frozen=True)
class GuardVerdict:
    """Why a candidate was rejected: the rule and the differing words or values."""

    rule: Literal["negation", "number", "contrast"]
    detail: str


def _tokens(text: str) -> list[str]:
    text = text.lower().translate(_APOSTROPHES)
    return _TOKEN.findall(text)


def _numbers(tokens: list[str]) -> Counter[str]:
    """Numbers as canonical strings; a run of number words is one number
    ("twenty five" -> 25, "two hundred" -> 200)."""
    out: Counter[str] = Counter()
    run: float | None = None
    current = 0.0

    def flush() -> None:
        nonlocal run, current
        if run is not None:
            out[_canonical(run + current)] += 1
        run, current = None, 0.0

    for tok in tokens:
        if tok[0].isdigit():
            flush()
            if tok[-2:] in ("st", "nd", "rd", "th"):
                out["#" + tok[:-2]] += 1
            else:
                value = tok.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", tok) else tok
                out[value] += 1
        elif tok in _UNITS or tok in _TENS:
            if run is None:
                run = 0.0
            current += _UNITS.get(tok, 0) + _TENS.get(tok, 0)
        elif tok in _SCALES and run is not None:
            current = max(current, 1.0) * _SCALES[tok]
            if _SCALES[tok] >= 1000:
                run, current = run + current, 0.0
        elif tok in _SCALES:  # "a hundred"
            run, current = 0.0, float(_SCALES[tok])
        elif tok in _ORDINALS:
            flush()
            out[f"#{_ORDINALS[tok]}"] += 1
        elif tok in _MISC_NUMBERS:
            flush()
            out[_canonical(_MISC_NUMBERS[tok])] += 1
        else:
            flush()
    flush()
    return out


def _canonical(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def signals(text: str) -> Signals:
    """The negation count, numbers and contrast words of `text`."""
    tokens = _tokens(text)
    negations = 0
    contrasts: Counter[tuple[int, int]] = Counter()
    words: dict[tuple[int, int], str] = {}
    for tok in tokens:
        if tok in _NEGATIONS or tok.endswith("n't"):
            negations += 1
        side = _SIDES.get(tok)
        if side is not None:
            contrasts[side] += 1
            words.setdefault(side, tok)
    return Signals(negations, _numbers(tokens), contrasts, words)


def guard_rejects(query: str | Signals, candidate: str | Signals) -> GuardVerdict | None:
    """The reason `candidate` must not answer `query`, or None when the guard has none."""
    a = signals(query) if isinstance(query, str) else query
    b = signals(candidate) if isinstance(candidate, str) else candidate
    if a.negations != b.negations:
        return GuardVerdict("negation", f"{a.negations} vs {b.negations} negation(s)")
    if a.numbers != b.numbers:
        return GuardVerdict("number", f"{_show(a.numbers)} vs {_show(b.numbers)}")
    only_a, only_b = a.contrasts - b.contrasts, b.contrasts - a.contrasts
    for set_a, side_a in only_a:
        for set_b, side_b in only_b:
            if set_a == set_b and side_a != side_b:
                return GuardVerdict(
                    "contrast",
                    f"{a.contrast_words[set_a, side_a]!r} vs {b.contrast_words[set_b, side_b]!r}",
                )
    return None


def _show(numbers: Counter[str]) -> str:
    return "{" + ", ".join(sorted(numbers.elements())) + "}"
