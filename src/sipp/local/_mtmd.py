"""The only module that calls llama.cpp's multimodal library (`mtmd`), beside `_llama`.

A thin, typed layer over `llama_cpp.mtmd_cpp`: the projector's lifetime, turning a
prompt with media markers plus decoded images into text and image chunks, and running
one image chunk (vision encoder, then its embeddings decoded into a sequence of the
text model's context). Callers see Python types and opaque chunk handles only.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _llama

try:
    import llama_cpp as _lc
    from llama_cpp import mtmd_cpp as _mt
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("local endpoints need llama-cpp-python: pip install 'sipppy[local]'") from exc

__all__ = ["ImageChunk", "Projector", "Prompt", "RgbImage", "default_marker"]

_log_lock = threading.Lock()
_log_routed = False


def _route_log() -> None:
    """mtmd and its helpers log through their own callbacks: send them where llama.cpp's go."""
    global _log_routed
    with _log_lock:
        if not _log_routed:
            _mt.mtmd_log_set(_llama.log_callback(), ctypes.c_void_p(0))
            _mt.mtmd_helper_log_set(_llama.log_callback(), ctypes.c_void_p(0))
            _log_routed = True


def default_marker() -> str:
    """The text that stands for one image in a prompt (`<__media__>`)."""
    return bytes(_mt.mtmd_default_marker()).decode()


@dataclass(frozen=True)
class RgbImage:
    """Decoded pixels, 3 bytes per pixel, rows top to bottom; `key` identifies the source."""

    width: int
    height: int
    pixels: bytes
    key: str


@dataclass(frozen=True)
class ImageChunk:
    """An image's place in a prompt: `n_tokens` embeddings (which take `n_pos` positions)."""

    handle: Any  # the chunk inside its Prompt's list; valid while the Prompt lives
    n_tokens: int
    n_pos: int
    key: str  # the source image's key (an overview and its tiles share it)


class Prompt:
    """The chunks of one tokenized prompt, in order: token lists and image chunks.

    Owns the C chunk list; `close()` frees it (idempotent)."""

    def __init__(self, raw: Any, parts: list[list[int] | ImageChunk]) -> None:
        self._raw = raw
        self.parts = parts

    def close(self) -> None:
        if self._raw:
            _mt.mtmd_input_chunks_free(self._raw)
            self._raw = None


class Projector:
    """A vision projector (mmproj GGUF) bound to its text model. Free with `close()`.

    `tokenize` may run on any thread (llama.cpp's server calls it from its HTTP
    threads); `eval_image` only on the thread that owns the llama context."""

    def __init__(
        self,
        path: Path,
        model: _llama.LlamaModel,
        *,
        n_threads: int,
        use_gpu: bool,
        flash_attention: bool | None = None,
        image_min_tokens: int | None,
        image_max_tokens: int | None,
    ) -> None:
        _llama.backend_init()
        _route_log()
        params = _mt.mtmd_context_params_default()
        _llama.set_fields(
            params,
            use_gpu=use_gpu,
            n_threads=n_threads,
            print_timings=False,
            # llama.cpp's own choice (-1, "auto") unless the caller decided.
            flash_attn_type=-1 if flash_attention is None else int(flash_attention),
        )
        if image_min_tokens is not None:
            _llama.set_fields(params, image_min_tokens=image_min_tokens)
        if image_max_tokens is not None:
            _llama.set_fields(params, image_max_tokens=image_max_tokens)
        _llama.recent_log_errors()
        ptr = _mt.mtmd_init_from_file(os.fsencode(path), model.ptr, params)
        if not ptr:
            raise RuntimeError(
                "; ".join(_llama.recent_log_errors()) or "mtmd could not load the projector"
            )
        self._ptr = ptr
        self.vision = bool(_mt.mtmd_support_vision(ptr))
        self.mrope = bool(_mt.mtmd_decode_use_mrope(ptr))
        marker = _mt.mtmd_get_marker(ptr)
        self.marker = marker.decode() if marker else default_marker()

    def close(self) -> None:
        if self._ptr:
            _mt.mtmd_free(self._ptr)
            self._ptr = None

    def tokenize(
        self, text: str, images: list[RgbImage], *, add_special: bool, parse_special: bool = True
    ) -> Prompt:
        """Split `text` at its markers (one per image, in order) into token and image
        chunks. Raises ValueError when markers and images disagree or an image cannot
        be preprocessed."""
        bitmaps = []
        try:
            for image in images:
                data = (ctypes.c_uint8 * len(image.pixels)).from_buffer_copy(image.pixels)
                bitmap = _mt.mtmd_bitmap_init(image.width, image.height, data)
                if not bitmap:
                    raise ValueError("mtmd could not take the image")
                bitmaps.append(bitmap)
                _mt.mtmd_bitmap_set_id(bitmap, image.key.encode())
            raw = _mt.mtmd_input_chunks_init()
            encoded = text.encode()
            inp = _mt.mtmd_input_text(encoded, len(encoded), add_special, parse_special)
            array = (_mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            _llama.recent_log_errors()
            status = int(_mt.mtmd_tokenize(self._ptr, raw, ctypes.byref(inp), array, len(bitmaps)))
            if status != 0:
                _mt.mtmd_input_chunks_free(raw)
                detail = "; ".join(_llama.recent_log_errors())
                if status == 1:
                    raise ValueError(
                        f"the prompt has a different number of image markers than images "
                        f"({len(images)} images)"
                    )
                raise ValueError(f"the image could not be preprocessed ({detail or status})")
        finally:
            for bitmap in bitmaps:
                _mt.mtmd_bitmap_free(bitmap)
        return Prompt(raw, _parts(raw))

    def eval_image(
        self, ctx: _llama.Context, chunk: ImageChunk, n_past: int, seq_id: int, n_batch: int
    ) -> int:
        """Encode `chunk` and decode its embeddings at positions n_past.. of `seq_id`.
        0 on success, else the failing call's status (encode failures are negative)."""
        with _llama.CPU.use(ctx.threads):  # the vision tower: a compute call like a decode
            status = int(_mt.mtmd_encode_chunk(self._ptr, chunk.handle))
        if status != 0:
            return -1000 - abs(status)
        embd = _mt.mtmd_get_output_embd(self._ptr)
        new_past = _lc.llama_pos(0)
        with _llama.CPU.use(ctx.threads):
            try:
                return self._decode_image(ctx, chunk, embd, n_past, seq_id, n_batch, new_past)
            finally:  # as after an encode: an image is rare, its pool's polling is not needed
                ctx.sleep_workers()

    def _decode_image(
        self,
        ctx: _llama.Context,
        chunk: ImageChunk,
        embd: Any,
        n_past: int,
        seq_id: int,
        n_batch: int,
        new_past: Any,
    ) -> int:
        return int(
            _mt.mtmd_helper_decode_image_chunk(
                self._ptr,
                ctx.ptr,
                chunk.handle,
                embd,
                n_past,
                seq_id,
                n_batch,
                ctypes.byref(new_past),
                _mt.mtmd_helper_post_decode_callback(),
                None,
            )
        )


def _parts(raw: Any) -> list[list[int] | ImageChunk]:
    parts: list[list[int] | ImageChunk] = []
    for i in range(int(_mt.mtmd_input_chunks_size(raw))):
        chunk = _mt.mtmd_input_chunks_get(raw, i)
        kind = int(_mt.mtmd_input_chunk_get_type(chunk))
        if kind == _mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            ptr = _mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            parts.append([int(ptr[j]) for j in range(n.value)])
            continue
        if kind != _mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            raise ValueError("only image media are supported")
        chunk_id = _mt.mtmd_input_chunk_get_id(chunk)
        parts.append(
            ImageChunk(
                chunk,
                int(_mt.mtmd_input_chunk_get_n_tokens(chunk)),
                int(_mt.mtmd_input_chunk_get_n_pos(chunk)),
                chunk_id.decode() if chunk_id else "",
            )
        )
    return parts
