"""The semantic cache's building blocks on real all-MiniLM-L6-v2 embeddings: the
vector index (exact and ANN), the in-partition lookup, persistence, and the
calibration command run for real on the shipped labelled set."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from sipp import (
    ContextRuntimeConfig,
    InvalidRequestError,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    models,
)
from sipp.gateway.cache.calibration import load_pairs
from sipp.gateway.cache.semantic import SemanticPartition
from sipp.gateway.cache.vector_index import VectorIndex, ann_available

Embed = Callable[[list[str]], npt.NDArray[np.float32]]
MINILM = "all-MiniLM-L6-v2/mean"
MINILM_CLS = "all-MiniLM-L6-v2/cls"  # same weights, other pooling: another vector space


def _embedder(client: SippClient, name: str, path: Path, pooling: str) -> Embed:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(
            n_ctx=128, n_parallel=4, n_threads=1, embeddings=True, pooling=pooling
        )
    )
    ref = client.add(name, LocalModelDescriptor(path, config))

    def embed(texts: list[str]) -> npt.NDArray[np.float32]:
        out = []
        for start in range(0, len(texts), 16):
            runs = [client.embed(t, endpoint=ref) for t in texts[start : start + 16]]
            out.extend(run.result().values for run in runs)
        return np.asarray(out, dtype=np.float32)

    return embed


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return models.pull("all-minilm-l6-v2", verify=False)


@pytest.fixture(scope="module")
def embedders(minilm_path: Path) -> Iterator[dict[str, Embed]]:
    with SippClient() as client:
        yield {
            MINILM: _embedder(client, "mean", minilm_path, "mean"),
            MINILM_CLS: _embedder(client, "cls", minilm_path, "cls"),
        }


@pytest.fixture(scope="module")
def corpus(embedders: dict[str, Embed]) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Every distinct text of the shipped calibration set, embedded once."""
    texts = sorted({t for p in load_pairs() for t in (p.query, p.cached)})
    return texts, embedders[MINILM](texts)


# -- vector index ---------------------------------------------------------------------------
def test_exact_index_finds_the_nearest_and_scores_cosine(
    corpus: tuple[list[str], npt.NDArray[np.float32]],
) -> None:
    texts, vectors = corpus
    index = VectorIndex(vectors.shape[1], use_ann=False)
    index.add_many(np.arange(len(texts)), vectors)
    for i in (0, 17, len(texts) - 1):
        top = index.search(vectors[i] * 3.0, k=3)  # any scale: vectors are normalised
        assert top[0].key == i and top[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert top[0].similarity >= top[1].similarity >= top[2].similarity
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        assert top[1].similarity == pytest.approx(float(unit[top[1].key] @ unit[i]), abs=1e-5)


def test_remove_and_replace_keep_keys_and_rows_consistent(
    corpus: tuple[list[str], npt.NDArray[np.float32]],
) -> None:
    _, vectors = corpus
    index = VectorIndex(vectors.shape[1], use_ann=False)
    index.add_many(np.arange(50), vectors[:50])
    assert index.remove(10) and not index.remove(10) and len(index) == 49
    assert all(n.key != 10 for n in index.search(vectors[10], k=49))
    assert index.search(vectors[49], k=1)[0].key == 49  # the row that moved into 10's place
    index.add(7, vectors[60])  # replacing a key moves its vector
    assert index.search(vectors[60], k=1)[0].key == 7 and len(index) == 49


def test_bad_vectors_are_typed_errors() -> None:
    index = VectorIndex(4, use_ann=False)
    with pytest.raises(InvalidRequestError):
        index.add(1, [1.0, 2.0, 3.0])  # wrong dimension
    with pytest.raises(InvalidRequestError):
        index.add(1, [0.0, 0.0, 0.0, 0.0])  # no direction
    with pytest.raises(InvalidRequestError):
        index.add(1, [float("nan"), 0.0, 0.0, 1.0])
    with pytest.raises(InvalidRequestError):
        index.add(-1, [1.0, 0.0, 0.0, 0.0])
    index.add(1, [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(InvalidRequestError):
        index.search([1.0, 0.0], k=1)


def test_ann_agrees_with_exact_search(corpus: tuple[list[str], npt.NDArray[np.float32]]) -> None:
    assert ann_available(), "the cache extra (usearch) is part of the dev install"
    texts, vectors = corpus
    stored, queries = vectors[: len(texts) // 2], vectors[len(texts) // 2 :]
    exact = VectorIndex(vectors.shape[1], use_ann=False)
    ann = VectorIndex(vectors.shape[1], ann_min_size=100)
    exact.add_many(np.arange(len(stored)), stored)
    ann.add_many(np.arange(len(stored)), stored)
    assert ann.wait_built(120) and ann.uses_ann and not exact.uses_ann
    agree = 0
    for q in queries:
        e, a = exact.search(q, k=1)[0], ann.search(q, k=1)[0]
        if e.key == a.key:
            agree += 1
            assert a.similarity == pytest.approx(e.similarity, abs=1e-5)  # rescored exactly
    assert agree / len(queries) >= 0.98  # recall@1 of the graph against exact search
    assert ann.search(queries[0], k=1, exact=True)[0].key == exact.search(queries[0], k=1)[0].key


def test_index_grows_into_ann_past_its_threshold(
    corpus: tuple[list[str], npt.NDArray[np.float32]],
) -> None:
    _, vectors = corpus
    index = VectorIndex(vectors.shape[1], ann_min_size=200)
    for i in range(199):
        index.add(i, vectors[i])
    assert not index.uses_ann
    index.add(199, vectors[199])
    assert index.wait_built(120) and index.uses_ann
    index.add(200, vectors[200])  # later adds go into the graph too
    index.remove(5)
    assert index.search(vectors[200], k=1)[0].key == 200
    index.add(6, vectors[300])  # replacing a key in the graph
    assert index.search(vectors[300], k=1)[0].key == 6 and len(index) == 200
    assert index.search(vectors[6], k=1)[0].key != 6
    assert all(n.key != 5 for n in index.search(vectors[5], k=5))


# -- semantic partition ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def partition(embedders: dict[str, Embed]) -> SemanticPartition:
    cached = [
        "how do I turn on dark mode",
        "book 2 tickets to Paris",
        "is the pharmacy open on Sunday",
        "how do I reset my password",
    ]
    part = SemanticPartition(use_ann=False)
    for i, (text, vector) in enumerate(zip(cached, embedders[MINILM](cached))):
        part.add(text, vector, f"payload-{i}", MINILM)
    return part


def _lookup(
    part: SemanticPartition, embedders: dict[str, Embed], text: str, model: str = MINILM
) -> str | None:
    outcome = part.search(text, embedders[model]([text])[0], model, threshold=0.8)
    return outcome.match.entry.payload_id if outcome.match else None


def test_a_paraphrase_hits_and_meaning_flips_do_not(
    partition: SemanticPartition, embedders: dict[str, Embed]
) -> None:
    assert _lookup(partition, embedders, "how can I enable dark mode") == "payload-0"
    assert _lookup(partition, embedders, "I forgot my password, how do I reset it") == "payload-3"
    for flipped in (
        "how do I turn off dark mode",
        "book 3 tickets to Paris",
        "isn't the pharmacy open on Sunday",
    ):
        outcome = partition.search(flipped, embedders[MINILM]([flipped])[0], MINILM, 0.8)
        assert outcome.match is None, flipped
        # The embedding alone would have served it: the guard is what said no.
        assert outcome.rejected and outcome.rejected[0][0].similarity >= 0.8
        unguarded = partition.search(
            flipped, embedders[MINILM]([flipped])[0], MINILM, 0.8, guard=False
        )
        assert unguarded.match is not None


def test_models_never_mix(embedders: dict[str, Embed]) -> None:
    part = SemanticPartition(use_ann=False)
    text = "how do I turn on dark mode"
    part.add(text, embedders[MINILM]([text])[0], "p-mean", MINILM)
    cls_vector = embedders[MINILM_CLS]([text])[0]
    # The same text, embedded by the other model: nothing, even at threshold -1.
    assert part.search(text, cls_vector, MINILM_CLS, threshold=-1.0).match is None
    part.add(text, cls_vector, "p-cls", MINILM_CLS)
    assert part.search(text, cls_vector, MINILM_CLS, -1.0).match.entry.payload_id == "p-cls"  # type: ignore[union-attr]
    mean_hit = part.search(text, embedders[MINILM]([text])[0], MINILM, -1.0).match
    assert mean_hit is not None and mean_hit.entry.payload_id == "p-mean"
    assert sorted(part.models()) == sorted([MINILM, MINILM_CLS]) and len(part) == 2
    # A vector of another dimension under a known model id is refused, not compared.
    with pytest.raises(InvalidRequestError):
        part.add("x", np.ones(8, dtype=np.float32), "p-bad", MINILM)


def test_remove_and_replace_by_payload(embedders: dict[str, Embed]) -> None:
    part = SemanticPartition(use_ann=False)
    a, b = embedders[MINILM](["what is the capital of France", "who painted the Mona Lisa"])
    part.add("what is the capital of France", a, "p1", MINILM)
    part.add("who painted the Mona Lisa", b, "p1", MINILM)  # same payload id: replaces
    assert len(part) == 1
    assert part.search("what is the capital of France", a, MINILM, 0.9).match is None
    assert part.remove("p1") and not part.remove("p1") and len(part) == 0
    assert part.search("who painted the Mona Lisa", b, MINILM, 0.5).match is None


# -- calibration command ------------------------------------------------------------------------
CALIBRATE_TOML = """
public_bind = "127.0.0.1:18080"
management_bind = "127.0.0.1:18081"
admin_password_env = "UNUSED_ADMIN_PASSWORD"

[security.client_ip]
source = "peer"

[security.rate_limit]
enabled = false

[[targets]]
name = "minilm"
type = "local"
model = "{path}"
backend = "cpu"

[targets.runtime.context]
n_ctx = 128
n_parallel = 8
n_threads = 1
embeddings = true
pooling = "mean"

[[targets]]
name = "provider"
type = "openai"
model = "m"
api_key_env = "UNUSED_KEY"
"""


def _calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "cache", "calibrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_calibrate_prints_the_table_and_a_recommendation(minilm_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CALIBRATE_TOML.format(path=minilm_path))
    result = _calibrate("--config", str(config), "--embedding-target", "minilm")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "346 pairs (151 should hit, 195 must not) embedded with target minilm"
    )
    rows = [line for line in lines if line[:9].strip().replace(".", "").isdigit()]
    assert len(rows) == 30 and rows[0].split()[0] == "0.70" and rows[-1].split()[0] == "0.99"
    # threshold | precision recall rate n | precision recall rate n (guard on, then off)
    table = {float(r.split()[0]): [float(x) for x in r.replace("|", " ").split()[1:]] for r in rows}
    recommended = next(line for line in lines if line.startswith("recommended threshold: "))
    threshold = float(recommended.split()[2])
    _, recall_on, rate_on, false_on, _, _, rate_off, false_off = table[threshold]
    assert rate_on <= 0.01 and false_on <= 0.01 * 195 and recall_on > 0
    # It is the lowest such threshold, and the guard is what lets it be that low.
    assert all(v[3] > 0.01 * 195 for t, v in table.items() if t < threshold)
    assert false_off > false_on and rate_off > rate_on
    assert any(line.startswith(f"false hits at {threshold:.2f}, guard off:") for line in lines)


def test_calibrate_refuses_a_missing_or_non_local_target(minilm_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CALIBRATE_TOML.format(path=minilm_path))
    missing = _calibrate("--config", str(config), "--embedding-target", "nope")
    assert missing.returncode == 1
    assert "no target named 'nope' (local targets: minilm)" in missing.stderr
    provider = _calibrate("--config", str(config), "--embedding-target", "provider")
    assert provider.returncode == 1 and "calibration embeds with a local target" in provider.stderr
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_text('{"query": "a", "cached": "b", "expect": "maybe"}\n')
    bad = _calibrate(
        "--config", str(config), "--embedding-target", "minilm", "--pairs", str(bad_pairs)
    )
    assert bad.returncode == 1 and f"{bad_pairs}:1:" in bad.stderr
    assert "Traceback" not in bad.stderr + missing.stderr + provider.stderr


def test_calibrate_help_explains_itself() -> None:
    result = _calibrate("--help")
    assert result.returncode == 0
    for words in ("--embedding-target", "--target-false-hit-rate", "false-hit rate", "guard"):
        assert words in result.stdout


def test_bulk_add_builds_the_graph_once_and_replaces_by_payload(
    corpus: tuple[list[str], npt.NDArray[np.float32]],
) -> None:
    texts, vectors = corpus
    part = SemanticPartition(ann_min_size=200)
    part.add_many(texts[:300], vectors[:300], [f"p{i}" for i in range(300)], MINILM)
    assert len(part) == 300
    hit = part.search(texts[42], vectors[42], MINILM, 0.99).match
    assert hit is not None and hit.entry.payload_id == "p42" and hit.entry.text == texts[42]
    part.add_many([texts[400]], vectors[400:401], ["p42"], MINILM)  # p42 now names another text
    assert len(part) == 300
    moved = part.search(texts[400], vectors[400], MINILM, 0.99).match
    assert moved is not None and moved.entry.payload_id == "p42"
    gone = part.search(texts[42], vectors[42], MINILM, 0.99).match
    assert gone is None or gone.entry.payload_id != "p42"
    with pytest.raises(InvalidRequestError):
        part.add_many(["a", "b"], vectors[:2], ["dup", "dup"], MINILM)


def test_calibrate_says_so_when_no_threshold_meets_the_target(
    minilm_path: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CALIBRATE_TOML.format(path=minilm_path))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"query": "how do I reset my password", "cached": "how can I reset my password", '
        '"expect": "hit", "kind": "paraphrase"}\n'
        # Labelled miss yet the same words: every threshold serves it.
        '{"query": "reset my password", "cached": "reset my password", "expect": "miss", '
        '"kind": "intent"}\n'
    )
    result = _calibrate(
        "--config", str(config), "--embedding-target", "minilm", "--pairs", str(pairs)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].startswith("2 pairs (1 should hit, 1 must not)")
    assert "no threshold up to 0.99 keeps the false-hit rate within 0.010" in result.stdout
