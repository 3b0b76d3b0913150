"""Generate the tiny T5 test model: random weights, a real architecture, a real converter.

No small T5 GGUF ships on the package index and no model hub is reachable, so the
encoder-decoder tests run on one made here: a sentencepiece unigram tokenizer trained
on the text below, a small `T5ForConditionalGeneration` (t5-small layout: ReLU
feed-forward) with weights from a fixed seed, saved with `transformers` and
converted by the `convert_hf_to_gguf.py` that the pinned llama-cpp-python sdist vendors
(the same llama.cpp that runs it). The transformers folder stays next to the GGUF: the
tests run `generate` on it as the reference.

    python tests/make_tiny_t5.py        # generate (or find) it, print the GGUF path

Dev-only: needs torch, transformers, sentencepiece and protobuf (the `dev` extra), and
pip to fetch the sdist. The output lands in the model cache (`sipp.models.models_dir()`:
`SIPP_MODELS_DIR`, which `./dev` sets to `.build/models`) and is reused from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

NAME = "tiny-t5"
GGUF_NAME = "tiny-t5.f32.gguf"
SEED = 1234
# Recorded on this project's machines, the same from torch 2.13.0 and 2.14.1 (transformers
# 5.24, sentencepiece 0.2.3, llama-cpp-python 0.3.36) and from run to run. A mismatch means
# some tool changed what it writes: the tests compare with the transformers folder of the
# same generation, so they stay meaningful, and the script says which checksum it found.
# (spiece.model itself differs between runs: it records its temporary training path.)
GGUF_SHA256 = "2bc5b7dbe2dabd197cb9f8918c52b260962535848d2bf85766d011db424cd400"

# Small enough to train in a second; varied enough that a unigram vocabulary of a few
# hundred pieces has whole words, sub-words and single characters.
CORPUS = """\
translate English to German: The house is wonderful.
translate English to German: Hello, world.
summarize: The quick brown fox jumps over the lazy dog near the river bank.
summarize: Small models run on small machines, and tests should be quick.
question: What is the capital of France? context: Paris is the capital of France.
question: Where do the birds fly in winter? context: Many birds fly south.
The weather today is sunny with a light breeze from the west.
A tokenizer splits text into pieces, and a model reads those pieces.
Encoder-decoder models read the whole input first, then write the output.
The encoder sees every token at once; the decoder writes one token at a time.
Numbers like 1, 2, 3, 42 and 2026 appear in text as well.
Cats sleep most of the day, while dogs like to play in the garden.
She opened the window, and the cold morning air filled the room.
They walked along the beach, collecting shells and smooth stones.
He wrote a letter to his friend about the journey across the mountains.
Libraries keep books, maps, and records of the past for everyone.
Rivers flow to the sea, carrying sand and small stones with them.
The market sells apples, bread, cheese, fish and fresh vegetables.
Trains leave the station every hour, except on Sunday mornings.
Music filled the hall as the orchestra began to play the symphony.
"""


def target_dir() -> Path:
    from sipp.models import models_dir  # where the other test models are cached

    return models_dir() / NAME


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"[tiny-t5] {message}", file=sys.stderr, flush=True)


def _train_tokenizer(work: Path) -> Path:
    import sentencepiece as spm

    corpus = work / "corpus.txt"
    corpus.write_text(CORPUS * 4, encoding="utf-8")
    prefix = work / "spiece"
    # T5's special ids: pad 0 (also the decoder start), eos 1, unk 2, no bos.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=320,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _build_hf(work: Path, spiece: Path) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = spm.SentencePieceProcessor(model_file=str(spiece)).vocab_size()
    config = T5Config(
        vocab_size=vocab,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        # ReLU, as t5-small: ggml computes GELU through an fp16 table, which would add
        # its rounding to every difference the tests compare.
        feed_forward_proj="relu",
        # transformers 5 always ties the head to the embedding; False there means "do
        # not rescale the decoder output", which is what llama.cpp's T5 graph does.
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        n_positions=512,
    )
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(config).eval()
    # transformers' own init leaves a tiny random T5 echoing its input token (the output
    # head shares the embedding, which dominates the residual stream). Larger attention
    # and feed-forward outputs make the greedy text depend on the prompt, with top-2
    # logit gaps far above the float differences between torch and ggml.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:  # RMSNorm weights stay at 1
                continue
            if name.endswith("relative_attention_bias.weight"):
                std = 0.5
            elif name.startswith("shared") or "embed_tokens" in name or name == "lm_head.weight":
                std = 1.0
            elif name.endswith((".o.weight", ".wo.weight")):
                std = 8.0 * param.shape[1] ** -0.5
            else:
                std = param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    hf = work / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    shutil.copy(spiece, hf / "spiece.model")
    return hf


def _vendored_llama_cpp(work: Path) -> Path:
    version = metadata.version("llama_cpp_python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(work),
            f"llama-cpp-python=={version}",
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        members = [
            m
            for m in archive.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and any(
                part in m.name for part in ("/convert_hf_to_gguf.py", "/gguf-py/", "/conversion/")
            )
        ]
        archive.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _convert(llama_cpp: Path, hf: Path, out: Path, *extra: str) -> None:
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, the version it expects
    done = subprocess.run(
        [
            sys.executable,
            str(llama_cpp / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-4000:]}")


def generate() -> Path:
    """The GGUF path, generating the model first unless the cache already holds it."""
    target = target_dir()
    gguf = target / GGUF_NAME
    if gguf.is_file() and (target / "hf" / "config.json").is_file():
        return gguf
    target.parent.mkdir(parents=True, exist_ok=True)
    _log(f"generating {NAME} into {target}")
    with tempfile.TemporaryDirectory(prefix="sipp-tiny-t5-") as tmp:
        work = Path(tmp)
        spiece = _train_tokenizer(work)
        hf = _build_hf(work, spiece)
        llama_cpp = _vendored_llama_cpp(work)
        staging = work / "out"
        staging.mkdir()
        _convert(llama_cpp, hf, staging / GGUF_NAME)
        shutil.copytree(hf, staging / "hf")
        found = sha256(staging / GGUF_NAME)
        if found != GGUF_SHA256:
            _log(f"note: GGUF SHA-256 {found} differs from the recorded {GGUF_SHA256}")
        (staging / "SHA256").write_text(f"{found}  {GGUF_NAME}\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return gguf


if __name__ == "__main__":
    print(generate())
