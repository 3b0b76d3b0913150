"""The semantic-lookup benchmark's corpus: varied synthetic requests, embedded once
with the local all-MiniLM-L6-v2 and cached under .build/ (the 100,000 vectors take
minutes to embed on this CPU; the lookups they serve take milliseconds)."""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".build" / "bench" / "semantic_lookup"
VERSION = 1  # bump when the generator changes: the cached vectors are keyed by it

TEMPLATES = (
    "how do I {verb} the {thing} on my {device}",
    "can you {verb} my {thing} for {when}",
    "what is the best way to {verb} a {thing} in {place}",
    "please {verb} the {thing} before {when}",
    "why won't my {device} {verb} the {thing}",
    "show me how to {verb} {thing} settings in {place}",
    "is it safe to {verb} the {thing} on a {device}",
    "I need to {verb} {n} {thing}s by {when}",
    "where can I {verb} a {thing} near {place}",
    "explain how {thing} works on the {device}",
    "write a short note about the {thing} in {place}",
    "what does it cost to {verb} a {thing} in {place}",
    "remind me to {verb} the {thing} {when}",
    "compare the {thing} on the {device} with the one in {place}",
    "give me {n} tips to {verb} my {thing}",
    "summarize the {thing} report from {place}",
    "translate the {thing} manual for my {device}",
    "who handles {thing} requests in {place}",
    "schedule a {thing} review for {when}",
    "what happens if I {verb} the {thing} twice",
)
VERBS = (
    "reset",
    "update",
    "install",
    "cancel",
    "renew",
    "check",
    "repair",
    "replace",
    "share",
    "export",
    "back up",
    "configure",
    "clean",
    "track",
    "order",
    "return",
    "upgrade",
    "sync",
    "rename",
    "archive",
    "print",
    "scan",
    "unlock",
    "register",
)
THINGS = (
    "password",
    "router",
    "invoice",
    "subscription",
    "battery",
    "printer",
    "calendar",
    "passport",
    "account",
    "thermostat",
    "playlist",
    "budget",
    "contract",
    "ticket",
    "refund",
    "license",
    "backup",
    "firewall",
    "email alias",
    "delivery",
    "insurance policy",
    "recipe",
    "spreadsheet",
    "timesheet",
    "photo album",
    "bike lock",
    "garden hose",
    "car seat",
    "visa application",
    "library card",
    "gym membership",
    "phone plan",
)
DEVICES = (
    "laptop",
    "phone",
    "tablet",
    "smart TV",
    "watch",
    "desktop",
    "car",
    "fridge",
    "speaker",
    "e-reader",
    "console",
    "router",
)
PLACES = (
    "Berlin",
    "the office",
    "Lisbon",
    "my kitchen",
    "Tokyo",
    "the warehouse",
    "Nairobi",
    "the school",
    "Toronto",
    "the hospital",
    "Madrid",
    "the garage",
    "Seoul",
    "the lab",
)
WHEN = (
    "tomorrow",
    "next Monday",
    "Friday evening",
    "the end of the month",
    "tonight",
    "next week",
    "the weekend",
    "March 3rd",
    "the holidays",
    "noon",
)
NUMBERS = ("2", "3", "four", "five", "10", "a dozen", "twenty", "100")


def sentences(count: int, seed: int = 7) -> list[str]:
    """`count` distinct sentences, in a fixed (seeded) order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    for _ in itertools.count():
        text = rng.choice(TEMPLATES).format(
            verb=rng.choice(VERBS),
            thing=rng.choice(THINGS),
            device=rng.choice(DEVICES),
            place=rng.choice(PLACES),
            when=rng.choice(WHEN),
            n=rng.choice(NUMBERS),
        )
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")


def _cache_path(model: Path, count: int) -> Path:
    stat = model.stat()
    tag = hashlib.sha256(f"{model.name}:{stat.st_size}:{count}:{VERSION}".encode()).hexdigest()
    return CACHE / f"vectors-{count}-{tag[:12]}.npy"


def embedded(model: Path, texts: list[str], *, parallel: int = 8) -> np.ndarray:
    """The texts' L2-normalised float32 vectors, from the cache when present."""
    path = _cache_path(model, len(texts))
    if path.exists():
        return np.load(path)
    from sipp import ContextRuntimeConfig, LocalModelDescriptor, NativeRuntimeConfig, SippClient

    config = NativeRuntimeConfig(
        # One thread: on 2 shared cores a second llama.cpp worker thread spins against
        # the other processes (seen: 2 embeddings/s with 2 threads under load, 60 with 1).
        context=ContextRuntimeConfig(
            n_ctx=64,
            n_parallel=parallel,
            n_threads=1,
            n_threads_batch=1,
            embeddings=True,
            pooling="mean",
        )
    )
    out = np.empty((len(texts), 384), dtype=np.float32)
    started = time.perf_counter()
    with SippClient() as client:
        ref = client.add("corpus-embedder", LocalModelDescriptor(model, config))
        for start in range(0, len(texts), 4 * parallel):
            chunk = texts[start : start + 4 * parallel]
            runs = [client.embed(text, endpoint=ref) for text in chunk]  # batched by the engine
            for i, run in enumerate(runs):
                out[start + i] = run.result().values
            if start % 5000 < 4 * parallel:
                done = start + len(chunk)
                print(
                    f"  embedded {done}/{len(texts)} in {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out
