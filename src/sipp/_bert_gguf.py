"""Write a BERT sentence-embedding checkpoint (safetensors + vocab.txt) as a GGUF file.

Only what llama.cpp's `bert` architecture reads: hyper-parameters, the
WordPiece vocabulary in llama.cpp's "phantom space" form (a word-initial
piece gets a leading U+2581, a `##` continuation loses its marker, special
`[...]` tokens stay as they are), and the encoder tensors renamed to GGUF
names. Matrices are stored as f16; norms, biases and the token-type and position
tables stay f32. The safetensors container is read with numpy directly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["convert_bert"]

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_LAYER_NAMES = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_TOP_NAMES = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_SKIPPED = ("embeddings.position_ids", "pooler.")
_POOLING = {"mean": 1, "cls": 2}


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            fh.seek(base + start)
            raw = fh.read(end - start)
            yield name, np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


def _gguf_name(name: str) -> str:
    name = name.removeprefix("bert.")
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    if stem.startswith("encoder.layer."):
        index, _, rest = stem.removeprefix("encoder.layer.").partition(".")
        if rest in _LAYER_NAMES:
            return f"blk.{int(index)}.{_LAYER_NAMES[rest]}.{kind}"
    raise ValueError(f"unexpected BERT tensor {name!r}")


def _phantom(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert_bert(model_dir: Path, out: Path, *, name: str) -> None:
    """Convert the sentence-transformers BERT folder `model_dir` into `out`."""
    import gguf  # imported here: only model conversion needs it

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    pooling_cfg_path = model_dir / "1_Pooling" / "config.json"
    pooling = "mean"
    if pooling_cfg_path.is_file():
        pooling_cfg = json.loads(pooling_cfg_path.read_text(encoding="utf-8"))
        pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}

    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(_POOLING[pooling]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([_phantom(t) for t in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab]
    )
    ids = {t: i for i, t in enumerate(vocab)}
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])

    for tensor_name, array in _read_safetensors(model_dir / "model.safetensors"):
        if tensor_name.startswith(_SKIPPED) or tensor_name.removeprefix("bert.").startswith(
            _SKIPPED
        ):
            continue
        target = _gguf_name(tensor_name)
        # The graph adds token-type and position rows with plain adds, which need f32.
        half = array.ndim > 1 and not target.startswith(("token_types", "position_embd"))
        writer.add_tensor(target, array.astype(np.float16 if half else np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
