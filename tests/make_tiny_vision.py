"""Generate the tiny vision test model: random weights, a real architecture, a real converter.

No small vision GGUF with its projector ships on the package index and no model hub is
reachable, so the vision tests run on one made here, the way `make_tiny_t5.py` makes
the tiny T5 (and with its helpers): a small `Idefics3ForConditionalGeneration` (the
SmolVLM layout: a SigLIP-style vision tower, a pixel-shuffle connector, a Llama text
model) with weights from a fixed seed and a sentencepiece tokenizer trained on the
text below, saved with `transformers` and converted twice by the vendored
`convert_hf_to_gguf.py`: once for the text model, once with `--mmproj` for the
projector (the two files llama.cpp's multimodal tools load). The transformers folder
stays next to them: the tests run `generate` on it as the reference.

The vision tower takes 224x224 images (16-pixel patches, a 2x2 pixel shuffle: 49
embeddings per image); mtmd's Idefics3 preprocessing gives an image of that size one
overview and one tile, 98 embeddings in all.

    python tests/make_tiny_vision.py    # generate (or find) it, print the model path

Dev-only, like make_tiny_t5 (torch, transformers, sentencepiece, protobuf, Pillow).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__:
    from .make_tiny_t5 import _convert, _vendored_llama_cpp, sha256
else:  # run as a script (./dev test)
    from make_tiny_t5 import _convert, _vendored_llama_cpp, sha256  # type: ignore[no-redef]

NAME = "tiny-vision"
MODEL_NAME = "model.gguf"
MMPROJ_NAME = "mmproj.gguf"
SEED = 4321
IMAGE_SIZE = 224
# Recorded on this project's machine (torch 2.13.0, transformers 5.24, sentencepiece
# 0.2.3, llama-cpp-python 0.3.36) and the same from run to run; a mismatch is reported,
# not fatal: the tests compare with the transformers folder of the same generation.
MODEL_SHA256 = "55a7d275d4495e9ba8e88fadf06a5e1d72e6b1b9600366553b99b5946ff84d20"
MMPROJ_SHA256 = "e756b14bc87c81f892253b1c4b27f733491c5c2f6fc78bcb55fd4dc6ea5e2ea4"

# The pieces mtmd's Idefics3 layout and the chat template need as single tokens
# (mtmd looks "\n\n", "<fake_token_around_image>" and "<global-img>" up by text).
SPECIAL_PIECES = (
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<row_1_col_1>",
    "\n\n",
    "\n",
)
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """\
What is in this picture? A red square on a blue background.
Describe the image in one sentence. The image shows a cat sleeping on a chair.
How many circles are there? There are three circles, two green and one yellow.
What colour is the sky in this photo? The sky is grey, with dark clouds over the sea.
Read the text in the image. The sign says: open every day from nine to five.
Is there a dog? No, there is a bird on a branch near the window.
The picture has stripes of red, orange, yellow, green, blue and violet.
A small boat sails across the lake while children play on the shore.
The chart shows sales rising from 12 in January to 48 in June.
Black and white squares form a checkerboard pattern across the whole frame.
A gradient runs from dark at the top left to bright at the bottom right.
Two people walk along a narrow street lined with old houses and shops.
"""


def target_dir() -> Path:
    from sipp.models import models_dir

    return models_dir() / NAME


def _log(message: str) -> None:
    print(f"[tiny-vision] {message}", file=sys.stderr, flush=True)


def _train_tokenizer(work: Path) -> Path:
    import sentencepiece as spm

    corpus = work / "corpus.txt"
    corpus.write_text(CORPUS * 4, encoding="utf-8")
    prefix = work / "tokenizer"
    # Llama's ids: unk 0, bos 1, eos 2. Identity normalisation keeps newlines (the chat
    # template and mtmd's layout use them); byte fallback covers any other text.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=400,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(SPECIAL_PIECES),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _randomize(model: object, seed: int) -> None:
    """Weights from one generator, scaled so both the prompt and the image steer the text.

    transformers' init leaves a tiny random model echoing its input; larger attention
    and feed-forward outputs and a strong connector make the greedy text depend on the
    image and the words, with top-2 logit gaps far above the float differences between
    torch and ggml.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # type: ignore[attr-defined]
            if name.endswith("norm.weight") or ".layer_norm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()
                continue
            if param.dim() == 1:  # biases
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
                continue
            if "embed_tokens" in name or name == "lm_head.weight":
                std = 1.0
            elif "position_embedding" in name:
                std = 0.5
            elif "patch_embedding" in name:
                std = (param[0].numel()) ** -0.5 * 2.0
            elif "modality_projection" in name or name.endswith(
                ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")
            ):
                std = 4.0 * param.shape[1] ** -0.5
            else:
                std = param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _build_hf(work: Path, spiece: Path) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    vocab = sp.vocab_size()
    image_token_id = sp.piece_to_id(IMAGE_TOKEN)
    eos_id = sp.piece_to_id("<|im_end|>")
    config = Idefics3Config(
        image_token_id=image_token_id,
        scale_factor=2,
        tie_word_embeddings=False,
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        text_config={
            "model_type": "llama",
            # the converter picks the text model's class from here (SmolVLM names its own)
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": eos_id,
            "pad_token_id": 0,
        },
        pad_token_id=0,
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).eval()
    _randomize(model, SEED)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 0
    hf = work / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    shutil.copy(spiece, hf / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        # The converter types these from here: bracketed ones as control tokens (matched
        # in prompts with parse_special), the newlines as user-defined (always matched).
        "added_tokens_decoder": {
            str(sp.piece_to_id(piece)): {"content": piece, "special": piece.startswith("<")}
            for piece in SPECIAL_PIECES
        },
    }
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1), "utf-8")
    preprocessor = {
        "image_processor_type": "Idefics3ImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": IMAGE_SIZE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_image_splitting": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "resample": 1,
    }
    (hf / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1), "utf-8")
    return hf


def generate() -> Path:
    """The text model's GGUF path (the projector is `mmproj.gguf` beside it)."""
    target = target_dir()
    model, mmproj = target / MODEL_NAME, target / MMPROJ_NAME
    if model.is_file() and mmproj.is_file() and (target / "hf" / "config.json").is_file():
        return model
    target.parent.mkdir(parents=True, exist_ok=True)
    _log(f"generating {NAME} into {target}")
    with tempfile.TemporaryDirectory(prefix="sipp-tiny-vision-") as tmp:
        work = Path(tmp)
        spiece = _train_tokenizer(work)
        hf = _build_hf(work, spiece)
        llama_cpp = _vendored_llama_cpp(work)
        staging = work / "out"
        staging.mkdir()
        _convert(llama_cpp, hf, staging / MODEL_NAME)
        _convert(llama_cpp, hf, staging / MMPROJ_NAME, "--mmproj")
        shutil.copytree(hf, staging / "hf")
        lines = []
        for name, recorded in ((MODEL_NAME, MODEL_SHA256), (MMPROJ_NAME, MMPROJ_SHA256)):
            found = sha256(staging / name)
            if found != recorded:
                _log(f"note: {name} SHA-256 {found} differs from the recorded {recorded}")
            lines.append(f"{found}  {name}\n")
        (staging / "SHA256").write_text("".join(lines), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return model


if __name__ == "__main__":
    print(generate())
