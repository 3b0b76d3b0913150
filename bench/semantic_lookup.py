"""Semantic-cache lookup on this CPU: embed the query with the local all-MiniLM-L6-v2,
search one partition of 100,000 entries, run the guard. Goal: p50 <= 10 ms, p99 <= 25 ms.

* corpus: varied synthetic requests (bench/_semantic_corpus.py), embedded once and
  cached under .build/bench/semantic_lookup/ (the first run embeds for many minutes)
* build: the partition's index, exact (numpy matrix) and ANN (usearch HNSW): build
  time and resident memory each
* lookups: distinct queries, each a light rewording of a stored entry, so every
  lookup is a would-be hit that goes through embedding, search and the guard;
  exact and ANN in alternating rounds (order flipped each round), p50/p99 per round,
  then median (min, max) across rounds
* recall@1 of the ANN against exact search on the same query vectors
* crossover: exact search time by partition size, against the graph at full size,
  which is where `ANN_MIN_SIZE` comes from
* --compare-libraries: usearch against hnswlib (build time, memory, search, recall@1)

    ./dev bench semantic_lookup [--entries 100000] [--queries 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import _semantic_corpus as corpus
from _stats import percentile, spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sipp import (  # noqa: E402
    ContextRuntimeConfig,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    models,
)
from sipp.gateway.cache.semantic import SemanticPartition  # noqa: E402
from sipp.gateway.cache.vector_index import ANN_MIN_SIZE, VectorIndex  # noqa: E402

MODEL_ID = "all-MiniLM-L6-v2"
REWORDINGS = (
    ("how do I ", "how can I "),
    ("can you ", "could you "),
    ("please ", "kindly "),
    ("what is ", "what's "),
    ("I need to ", "I have to "),
    ("where can I ", "where could I "),
    ("show me ", "can you show me "),
    ("give me ", "could you give me "),
    ("explain ", "please explain "),
    ("write ", "please write "),
)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reword(text: str, rng: random.Random) -> str:
    for old, new in REWORDINGS:
        if text.startswith(old):
            return new + text[len(old) :]
    return rng.choice(("hey, ", "quick question: ", "")) + text + rng.choice(("?", " please", "!"))


def build(
    texts: list[str], vectors: np.ndarray, use_ann: bool
) -> tuple[SemanticPartition, float, float]:
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    part = SemanticPartition(ann_min_size=0 if use_ann else len(texts) + 1, use_ann=use_ann)
    part.add_many(texts, vectors, [f"r{i}" for i in range(len(texts))], MODEL_ID)
    part.wait_built()  # the graph builds in the background
    return part, time.perf_counter() - started, rss_mib() - before


def crossover(vectors: np.ndarray, queries: np.ndarray) -> None:
    """Search alone (no embedding, no guard), with the reworded queries' vectors."""
    print("\nsearch alone by partition size (median over the queries):")
    sizes = [s for s in (1_000, 5_000, 10_000, 20_000, 50_000, 100_000) if s <= len(vectors)]
    for size in sizes:
        index = VectorIndex(vectors.shape[1], use_ann=False)
        index.add_many(np.arange(size), vectors[:size])
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search(q, 4)
            times.append(time.perf_counter() - t)
        print(f"  exact {size:>7,}: {statistics.median(times) * 1e3:.3f} ms")
    ann = VectorIndex(vectors.shape[1], ann_min_size=0)
    ann.add_many(np.arange(len(vectors)), vectors)
    ann.wait_built()
    times, agree = [], 0
    exact = VectorIndex(vectors.shape[1], use_ann=False)
    exact.add_many(np.arange(len(vectors)), vectors)
    for q in queries:
        t = time.perf_counter()
        top = ann.search(q, 4)
        times.append(time.perf_counter() - t)
        agree += top[0].key == exact.search(q, 1)[0].key
    print(f"  ANN   {len(vectors):>7,}: {statistics.median(times) * 1e3:.3f} ms")
    print(f"  (ANN_MIN_SIZE in the library: {ANN_MIN_SIZE:,})")
    print(f"recall@1 of the ANN vs exact, {len(queries)} queries: {agree / len(queries):.4f}")


def compare_libraries(vectors: np.ndarray, queries: np.ndarray) -> None:
    """usearch (the library's choice) against hnswlib at the same graph settings (M=16,
    ef_construction=128, ef=64), single-threaded search, on the same vectors."""
    import hnswlib
    from usearch.index import Index

    exact = VectorIndex(vectors.shape[1], use_ann=False)
    exact.add_many(np.arange(len(vectors)), vectors)
    truth = [exact.search(q, 1)[0].key for q in queries]
    print(f"\nANN libraries, {len(vectors):,} vectors, {len(queries)} queries:")
    for name in ("usearch f16", "usearch f32", "hnswlib f32"):
        gc.collect()
        before = rss_mib()
        t = time.perf_counter()
        if name.startswith("usearch"):
            index = Index(
                ndim=vectors.shape[1],
                metric="cos",
                dtype=name.split()[1],
                connectivity=16,
                expansion_add=128,
                expansion_search=64,
            )
            index.add(np.arange(len(vectors), dtype=np.uint64), vectors)

            def search(q: np.ndarray, index: Index = index) -> int:
                return int(index.search(q, 1, threads=1).keys[0])
        else:
            graph = hnswlib.Index(space="cosine", dim=vectors.shape[1])
            graph.init_index(max_elements=len(vectors), ef_construction=128, M=16)
            graph.add_items(vectors, np.arange(len(vectors)))
            graph.set_ef(64)
            graph.set_num_threads(1)

            def search(q: np.ndarray, graph: hnswlib.Index = graph) -> int:
                return int(graph.knn_query(q, k=1)[0][0][0])

        build = time.perf_counter() - t
        mib = rss_mib() - before
        times, agree = [], 0
        for q, want in zip(queries, truth):
            t = time.perf_counter()
            got = search(q)
            times.append(time.perf_counter() - t)
            agree += got == want
        print(
            f"  {name}: build {build:.1f} s, +{mib:.0f} MiB, search p50 "
            f"{statistics.median(times) * 1e3:.3f} ms p99 {percentile(times, 0.99) * 1e3:.3f} ms, "
            f"recall@1 {agree / len(queries):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=400, help="lookups per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threshold", type=float, default=0.86, help="similarity threshold (calibrated)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads embedding the query"
    )
    parser.add_argument(
        "--compare-libraries",
        action="store_true",
        help="also build usearch (f16, f32) and hnswlib graphs and compare them (needs hnswlib)",
    )
    args = parser.parse_args()

    model = models.pull("all-minilm-l6-v2", verify=False)
    texts = corpus.sentences(args.entries)
    t = time.perf_counter()
    vectors = corpus.embedded(model, texts)
    print(
        f"{len(texts):,} entries: vectors ready in {time.perf_counter() - t:.1f} s (cached after the first run)"
    )

    exact_part, exact_build, exact_mib = build(texts, vectors, use_ann=False)
    print(f"build exact: {exact_build:.2f} s, +{exact_mib:.0f} MiB resident")
    del exact_part
    part, ann_build, ann_mib = build(texts, vectors, use_ann=True)
    print(f"build ANN (matrix + HNSW graph): {ann_build:.2f} s, +{ann_mib:.0f} MiB resident")

    rng = random.Random(11)
    needed = args.queries * args.rounds * 2 + 50
    picks = rng.sample(range(len(texts)), min(needed, len(texts)))
    queries = [(reword(texts[i], rng), i) for i in picks]

    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(
            n_ctx=128,
            n_parallel=1,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            embeddings=True,
            pooling="mean",
        )
    )
    with SippClient() as client:
        ref = client.add("minilm", LocalModelDescriptor(model, config))

        query_vectors: list[list[float]] = []  # for recall@1 and the crossover below

        def lookup(text: str, exact: bool) -> tuple[float, float, bool, str | None]:
            start = time.perf_counter()
            vector = client.embed(text, endpoint=ref).result().values
            embedded_at = time.perf_counter()
            query_vectors.append(vector)
            outcome = part.search(text, vector, MODEL_ID, args.threshold, exact=exact)
            end = time.perf_counter()
            payload = outcome.match.entry.payload_id if outcome.match else None
            return end - start, end - embedded_at, outcome.match is not None, payload

        for text, _ in queries[:50]:  # warm-up: model pages, allocator, graph caches
            lookup(text, exact=False)
        cursor = 50
        results: dict[str, list[dict[str, float]]] = {"exact": [], "ann": []}
        for round_no in range(args.rounds):
            order = ("exact", "ann") if round_no % 2 == 0 else ("ann", "exact")
            for mode in order:
                batch = queries[cursor : cursor + args.queries]
                cursor += args.queries
                totals, searches, hits, right = [], [], 0, 0
                for text, source in batch:
                    total, search, hit, payload = lookup(text, exact=mode == "exact")
                    totals.append(total)
                    searches.append(search)
                    hits += hit
                    right += payload == f"r{source}"
                summary = {
                    "p50": percentile(totals, 0.5),
                    "p99": percentile(totals, 0.99),
                    "search_p50": percentile(searches, 0.5),
                    "search_p99": percentile(searches, 0.99),
                    "hit_rate": hits / len(batch),
                    "right": right / len(batch),
                }
                results[mode].append(summary)
                print(
                    f"round {round_no + 1} {mode:>5}: lookup p50 {summary['p50'] * 1e3:.2f} ms, "
                    f"p99 {summary['p99'] * 1e3:.2f} ms (search+guard p50 "
                    f"{summary['search_p50'] * 1e3:.3f} ms, p99 {summary['search_p99'] * 1e3:.3f} ms); "
                    f"hits {summary['hit_rate']:.3f}, from the reworded entry {summary['right']:.3f}",
                    flush=True,
                )

    print(
        f"\nsemantic lookup, {len(texts):,} entries in one partition, threshold {args.threshold}, "
        f"{args.queries} queries x {args.rounds} rounds per mode, query embedded with {args.threads} thread(s):"
    )
    for mode in ("exact", "ann"):
        rows = results[mode]
        print(
            f"  {mode:>5}: p50 {spread([r['p50'] for r in rows], '.2f', 'ms', 1e3)}; "
            f"p99 {spread([r['p99'] for r in rows], '.2f', 'ms', 1e3)}; "
            f"search+guard p50 {spread([r['search_p50'] for r in rows], '.3f', 'ms', 1e3)}"
        )
    query_matrix = np.asarray(query_vectors[50:350], dtype=np.float32)
    crossover(vectors, query_matrix)
    if args.compare_libraries:
        compare_libraries(vectors, query_matrix)


if __name__ == "__main__":
    main()
