"""The only module that imports `llama_cpp`.

A thin, typed layer over llama-cpp-python's low-level ctypes API: model and
context lifetime, tokenizer, batches, samplers, embeddings, metadata and the
llama.cpp log. Everything above this module speaks Python types only, so a
different binding could replace this file alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import llama_cpp as _lc
    from llama_cpp import llama_grammar as _grammar
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("local endpoints need llama-cpp-python: pip install 'sipppy[local]'") from exc

__all__ = [
    "Batch",
    "Context",
    "LlamaModel",
    "Sampler",
    "SamplerSettings",
    "backend_init",
    "cpu_has_amx",
    "installed_backends",
    "json_schema_rules",
    "json_schema_to_grammar",
    "llama_version",
    "recent_log_errors",
]

logger = logging.getLogger("sipp.llama")

POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}
POOLING_NAMES = {v: k for k, v in POOLING.items()}
DEFAULT_SEED = 0xFFFFFFFF
NO_TOKEN = -1  # Sampler.sample's answer when its grammar admits no token
REPEAT_WINDOW = 64  # the tokens repeat_penalty looks back over, llama.cpp's default

_init_lock = threading.Lock()
_initialised = False
_log_tail: deque[str] = deque(maxlen=20)
_log_lock = threading.Lock()
# llama.cpp logs from whichever thread is working (load, decode, a sampler build), each
# line in pieces; a shared buffer would splice pieces of different threads together.
_log_partial = threading.local()


GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # continues the line the previous piece began


def _log_to_python(level: int, text: bytes, _user: Any) -> None:
    piece = text.decode("utf-8", errors="replace") if text else ""
    pieces: list[str] | None = getattr(_log_partial, "pieces", None)
    if pieces is None:
        pieces = _log_partial.pieces = []
    if not pieces and level != GGML_LOG_LEVEL_CONT:
        _log_partial.level = level  # a line's level is that of its first piece
    pieces.append(piece)
    if not piece.endswith("\n"):
        return
    line = "".join(pieces).rstrip()
    pieces.clear()
    if not line:
        return
    if getattr(_log_partial, "level", 0) == GGML_LOG_LEVEL_ERROR:
        with _log_lock:
            _log_tail.append(line)
        logger.debug("llama.cpp error: %s", line)
    else:
        logger.debug("llama.cpp: %s", line)


# Kept referenced for the life of the process: llama.cpp holds the C pointer.
_log_callback: Any = _lc.llama_log_callback(_log_to_python)


def log_callback() -> Any:
    """The ctypes log callback, for the multimodal library's logs (`_mtmd`)."""
    return _log_callback


def backend_init() -> None:
    global _initialised
    with _init_lock:
        if _initialised:
            return
        _lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _lc.llama_backend_init()
        _initialised = True


def recent_log_errors() -> list[str]:
    """llama.cpp's last error lines, to explain a failed load in our own error."""
    with _log_lock:
        lines = list(_log_tail)
        _log_tail.clear()
    return lines


def llama_version() -> str:
    return str(getattr(_lc, "__version__", "unknown"))


def installed_backends() -> list[str]:
    """Backends compiled into the installed llama.cpp build (`cpu` always)."""
    lib_dir = Path(_lc.__file__).parent / "lib"
    names = {p.name for p in lib_dir.glob("*")} if lib_dir.is_dir() else set()
    found = ["cpu"]
    for backend in ("cuda", "vulkan", "metal"):
        if any(f"ggml-{backend}" in name for name in names):
            found.append(backend)
    if len(found) == 1 and _lc.llama_supports_gpu_offload():
        found.append("gpu")
    return found


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return "amx_tile" in fh.read()
    except OSError:
        return False


# A character of a JSON string, as llama.cpp's own converter writes it: llama-cpp-python's
# leaves out the control characters JSON requires escaped, so a string could hold a raw
# line break and the output would not parse.
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_SchemaConverter: Any = _grammar.SchemaConverter  # untyped upstream


class _JsonConverter(_SchemaConverter):  # type: ignore[misc]
    def _add_primitive(self, name: str, rule: Any) -> Any:
        if name == "char":
            rule = _grammar.BuiltinRule(_JSON_CHAR, [])
        return super()._add_primitive(name, rule)


def json_schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF whose `root` rule matches JSON that follows `schema`."""
    return json_schema_rules({"root": schema})


def json_schema_rules(schemas: Mapping[str, Mapping[str, Any]]) -> str:
    """GBNF with one rule per entry, named by its key, matching JSON that follows its
    schema; the rules they share (`space`, `string`, ...) appear once. Lets a caller
    build a larger grammar around them."""
    import json

    converter = _JsonConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    for rule, schema in schemas.items():
        # The round trip copies the schema (the converter edits what it resolves).
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "" if rule == "root" else rule)
    return str(converter.format_grammar())


def set_fields(struct: Any, **values: Any) -> None:
    """Assign fields of a ctypes struct by name, refusing a name it lacks: ctypes would
    keep that as a plain Python attribute that C never reads (llama.cpp replaced
    use_mmap and use_mlock with load_mode, and setting the old names did nothing)."""
    unknown = set(values) - {field[0] for field in type(struct)._fields_}
    if unknown:
        raise AttributeError(f"{type(struct).__name__} has no field {', '.join(sorted(unknown))}")
    for name, value in values.items():
        setattr(struct, name, value)


def load_mode(use_mmap: bool | None, use_mlock: bool) -> int:
    """llama.cpp's load mode for the placement's two switches; with neither set,
    llama.cpp's own choice (it maps the file where the backend allows)."""
    if use_mlock:
        return _lc.LLAMA_LOAD_MODE_MLOCK if use_mmap is False else _lc.LLAMA_LOAD_MODE_MMAP_MLOCK
    if use_mmap is None:
        return _lc.LLAMA_LOAD_MODE_AUTO
    return _lc.LLAMA_LOAD_MODE_MMAP if use_mmap else _lc.LLAMA_LOAD_MODE_NONE


@dataclass(frozen=True)
class ModelParams:
    gpu_layers: int
    main_gpu: int
    use_mmap: bool | None  # None: llama.cpp's choice
    use_mlock: bool
    use_extra_bufts: bool


class LlamaModel:
    """A loaded model plus its vocabulary. Free with `close()`."""

    def __init__(self, path: Path, params: ModelParams) -> None:
        backend_init()
        mp = _lc.llama_model_default_params()
        set_fields(
            mp,
            n_gpu_layers=params.gpu_layers,
            main_gpu=params.main_gpu,
            load_mode=load_mode(params.use_mmap, params.use_mlock),
            use_extra_bufts=params.use_extra_bufts,
        )
        recent_log_errors()
        ptr = _lc.llama_model_load_from_file(os.fsencode(path), mp)
        if not ptr:
            raise RuntimeError("; ".join(recent_log_errors()) or "llama.cpp could not load it")
        self._ptr = ptr
        self.vocab = _lc.llama_model_get_vocab(ptr)
        self.n_vocab = int(_lc.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(_lc.llama_model_n_ctx_train(ptr))
        self.n_positions = position_table_rows(path)
        self.n_embd = int(_lc.llama_model_n_embd(ptr))
        self.has_encoder = bool(_lc.llama_model_has_encoder(ptr))
        self.has_decoder = bool(_lc.llama_model_has_decoder(ptr))
        # T5 and its family; an encoder-only model (T5ENCODER) is an embedding model.
        self.encoder_decoder = self.has_encoder and self.has_decoder
        # llama.cpp calls BERT a decoder too, but a model whose attention sees both ways
        # has no next token to predict: its graph writes no logits to sample from.
        arch = self.meta("general.architecture")
        bidirectional = arch is not None and self.meta(f"{arch}.attention.causal") == "false"
        self.generates = self.has_decoder and (self.encoder_decoder or not bidirectional)
        # Encoder-decoder models: the token the decoder starts from, as llama.cpp's own
        # examples pick it (the model's decoder-start token, else BOS).
        start = int(_lc.llama_model_decoder_start_token(ptr))
        self.decoder_start = start if start >= 0 else int(_lc.llama_vocab_bos(self.vocab))
        self.add_bos = bool(_lc.llama_vocab_get_add_bos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._eog: dict[int, bool] = {}
        self._pieces: dict[int, bytes] = {}  # at most the vocabulary

    @property
    def ptr(self) -> Any:
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            _lc.llama_model_free(self._ptr)
            self._ptr = None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = _lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        _lc.llama_model_desc(self._ptr, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = _lc.llama_model_chat_template(self._ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (_lc.llama_token * cap)()
        n = _lc.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (_lc.llama_token * cap)()
            n = _lc.llama_tokenize(
                self.vocab, data, len(data), arr, cap, add_special, parse_special
            )
        tokens: list[int] = arr[:n]  # slicing a ctypes array already builds a new list
        return tokens

    def piece(self, token: int, *, special: bool = False) -> bytes:
        if not special:  # the generation path: each token's bytes asked of llama.cpp once
            known = self._pieces.get(token)
            if known is None:
                known = self._pieces[token] = self._piece(token, False)
            return known
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        buf = self._piece_buf
        n = _lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:  # asked once per token id: one ctypes call fewer per generated token
            eog = self._eog[token] = bool(_lc.llama_vocab_is_eog(self.vocab, token))
        return eog

    def bos(self) -> int:
        return int(_lc.llama_vocab_bos(self.vocab))

    def eos(self) -> int:
        return int(_lc.llama_vocab_eos(self.vocab))

    def apply_builtin_template(self, template: str, messages: Sequence[tuple[str, str]]) -> str:
        """llama.cpp's own (non-Jinja) template renderer; used as an independent check."""
        n = len(messages)
        keep = [(r.encode(), c.encode()) for r, c in messages]
        arr = (_lc.llama_chat_message * n)(
            *[_lc.llama_chat_message(role=r, content=c) for r, c in keep]
        )
        cap = sum(len(c) for _, c in keep) * 2 + 1024
        buf = ctypes.create_string_buffer(cap)
        size = _lc.llama_chat_apply_template(template.encode(), arr, n, True, buf, cap)
        if size < 0:
            raise ValueError("llama.cpp does not recognise this template")
        if size > cap:
            buf = ctypes.create_string_buffer(size)
            _lc.llama_chat_apply_template(template.encode(), arr, n, True, buf, size)
        return buf.raw[:size].decode("utf-8")


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int
    n_threads_batch: int
    embeddings: bool
    pooling: str | None
    flash_attention: bool | None
    offload_kqv: bool
    op_offload: bool
    profiling: bool
    # One KV stream for every sequence. Encoder-decoder models need it: with a stream per
    # sequence llama.cpp splits a batch into equal per-sequence parts, which its
    # cross-attention refuses (an assert that aborts the process).
    unified_kv: bool = False


class CpuBudget:
    """The process's cores, shared by every context's decodes.

    Each llama context brings its own ggml thread pool, whose threads spin at every
    barrier of a graph. Two contexts computing at once with 2 threads each on 2 cores
    stall each other at every barrier: measured, a chat model decoding beside an
    embedding model that embeds back to back fell from 102 to 1.6 tokens/s. A compute
    call here first takes as many cores as it runs threads (all of them at most), so
    such calls take turns instead, while contexts whose threads fit together still run
    side by side (two 1-thread contexts on 2 cores).

    A process with a single context has nobody to take turns with, and a lock taken
    and released around every decode costs a tiny model about 1 % of its speed, so
    decodes skip the budget while `shared` is false (see `Context.decode`)."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._free = self.cores
        self._waiting = 0
        self._cond = threading.Condition()
        self._contexts = 0
        self.shared = False  # more than one context alive: decodes take turns

    def join(self) -> None:
        """A context was created."""
        with self._cond:
            self._contexts += 1
            self.shared = self._contexts > 1

    def leave(self) -> None:
        """A context was freed."""
        with self._cond:
            self._contexts -= 1
            self.shared = self._contexts > 1

    def need(self, threads: int) -> int:
        """The cores a compute call running `threads` threads takes."""
        return min(max(1, threads), self.cores)

    def take(self, need: int) -> None:
        """Wait for `need` cores (from `need`) and take them; `give` them back after."""
        with self._cond:
            while self._free < need:
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            self._free -= need

    @property
    def wanted(self) -> bool:
        """Whether a compute call waits for cores now."""
        return self._waiting > 0

    def give(self, need: int) -> None:
        with self._cond:
            self._free += need
            if self._waiting:  # notify_all is Python code: skip it on the per-token path
                self._cond.notify_all()

    @contextlib.contextmanager
    def use(self, threads: int) -> Iterator[None]:
        need = self.need(threads)
        self.take(need)
        try:
            yield
        finally:
            self.give(need)


CPU = CpuBudget(os.cpu_count() or 1)

# llama_get_logits(_ith) returning the address as an int: no pointer object to cast.
_logits_ith_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ("llama_get_logits_ith", _lc.llama_cpp._lib)
)
_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
    ("llama_get_logits", _lc.llama_cpp._lib)
)


def _floats_at(addr: int, n: int) -> npt.NDArray[np.float32]:
    """A numpy view (no copy) of `n` C floats at `addr`."""
    return np.frombuffer(memoryview((ctypes.c_float * n).from_address(addr)), np.float32)


GGML_MAX_N_THREADS = 512  # ggml.h: the length of ggml_threadpool_params.cpumask
# ggml's polling level for a pool's idle workers. 1 is ~131k pause instructions, a few
# milliseconds: enough to span the gap between two decodes of one request (0.13 ms on
# SmolLM2), so the next decode finds its worker awake (paired with llama-batched-bench
# B=1: about 0.98 with 0, 1.01 with 1), short enough that an idle model soon sleeps.
# When another context waits for the cores, a decode pauses its pool before giving them.
THREAD_POLL = 1


class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


@dataclass(frozen=True)
class _PoolApi:
    new: Any
    free: Any
    pause: Any
    attach: Any


def _loaded_libraries(stem: str, symbol: str) -> list[Any]:
    """The libraries llama.cpp already loaded that export `symbol`: libllama itself (a
    build that links ggml in statically), then `stem`.so.0 and `stem`.so. RTLD_NOLOAD
    opens a library only if it is loaded already, so this never brings in a second copy."""
    candidates: list[Any] = [_lc.llama_cpp._lib]
    noload: int | None = getattr(os, "RTLD_NOLOAD", None)  # POSIX only
    for name in (f"{stem}.so.0", f"{stem}.so"):
        if noload is None:
            break
        try:
            candidates.append(ctypes.CDLL(name, mode=noload | os.RTLD_LAZY))
        except OSError:
            continue
    return [lib for lib in candidates if hasattr(lib, symbol)]


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _gguf_api() -> Any | None:
    """ggml's GGUF reader (llama-cpp-python binds none of it), or None if not found."""
    found = _loaded_libraries("libggml-base", "gguf_init_from_file")
    if not found:
        return None
    lib = found[0]
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_tensor.restype = ctypes.c_int64
    lib.gguf_get_tensor_ne.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_ne.restype = ctypes.POINTER(ctypes.c_int64)
    lib.gguf_free.argtypes, lib.gguf_free.restype = [ctypes.c_void_p], None
    return lib


def position_table_rows(path: Path) -> int | None:
    """How many positions the model's learned position table holds (BERT, GPT-2), or
    None when it has none (RoPE, ALiBi, T5's relative buckets: any position computes).
    llama.cpp reads past that table with a failed GGML_ASSERT, which aborts the process."""
    api = _gguf_api()
    if api is None:
        return None
    ctx = api.gguf_init_from_file(os.fsencode(path), _GgufInitParams(True, None))
    if not ctx:
        return None
    try:
        tensor = api.gguf_find_tensor(ctx, b"position_embd.weight")
        return int(api.gguf_get_tensor_ne(ctx, tensor)[1]) if tensor >= 0 else None
    finally:
        api.gguf_free(ctx)


@functools.cache
def _pool_api() -> _PoolApi | None:
    """ggml's thread pool calls and libllama's llama_attach_threadpool (llama-cpp-python
    binds neither); None if they cannot be found, and contexts keep ggml's per-decode
    threads.

    Only the ggml CPU library llama.cpp already loaded will do, never a second copy:
    the wheel ships `libggml-cpu.so` and `libggml-cpu.so.0` as two files, and a pool
    made by a copy runs the copy's kernels, whose tables `ggml_cpu_init` never filled
    (found by Qwen2.5's repacked Q4_K weights decoding to garbage). RTLD_NOLOAD opens
    a library only if it is loaded already."""
    found = _loaded_libraries("libggml-cpu", "ggml_threadpool_new")
    attach = getattr(_lc.llama_cpp._lib, "llama_attach_threadpool", None)
    if not found or attach is None:
        return None
    lib = found[0]
    api = _PoolApi(
        lib.ggml_threadpool_new, lib.ggml_threadpool_free, lib.ggml_threadpool_pause, attach
    )
    api.new.argtypes, api.new.restype = [ctypes.POINTER(_ThreadpoolParams)], ctypes.c_void_p
    api.free.argtypes, api.free.restype = [ctypes.c_void_p], None
    api.pause.argtypes, api.pause.restype = [ctypes.c_void_p], None
    api.attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    api.attach.restype = None
    return api


class ThreadPool:
    """ggml CPU worker threads kept for a context's lifetime.

    A context without one makes ggml start and join its worker threads on every
    decode, as llama-cpp-python's own contexts do; llama.cpp's tools (llama-server,
    llama-batched-bench) attach a pool instead. Measured on SmolLM2-135M, 2 threads,
    single-stream decode: 3 % faster with a pool. Its idle workers poll briefly
    (`THREAD_POLL`), then sleep; when another context waits for the cores they are put
    to sleep before the cores are given, so they do not spin into its turn."""

    def __init__(self, api: _PoolApi, n_threads: int) -> None:
        self._api = api
        self.ptr: Any = None
        if n_threads < 2:  # the calling thread computes alone: no worker to keep
            return
        # ggml_threadpool_params_init's defaults (no cpumask, normal priority, not
        # strict, not paused; ctypes zeroes the rest), but the polling level.
        params = _ThreadpoolParams(n_threads=n_threads, poll=THREAD_POLL)
        self.ptr = api.new(ctypes.byref(params))

    def pause(self) -> None:
        """Put the idle workers to sleep now rather than after their polling; the next
        compute call on the pool wakes them (ggml resumes a paused pool at kickoff)."""
        if self.ptr:
            self._api.pause(self.ptr)

    def close(self) -> None:
        if self.ptr:
            self._api.free(self.ptr)
            self.ptr = None


def attach_threadpools(ctx: Any, n_threads: int, n_threads_batch: int) -> list[ThreadPool]:
    """Give `ctx` kept worker threads: one pool, or one per thread count when single
    tokens and batches run different counts (a pool runs at most its own size)."""
    api = _pool_api()
    if api is None:
        return []
    pools = [ThreadPool(api, n_threads)]
    if n_threads_batch != n_threads:
        pools.append(ThreadPool(api, n_threads_batch))
    # A null pool (a 1-thread side) leaves that side to ggml's per-call threads, except
    # a null batch pool: llama.cpp then runs batches on the single-token pool, fine
    # since a pool can run fewer threads than it has.
    api.attach(ctx, pools[0].ptr, pools[-1].ptr)
    return [p for p in pools if p.ptr]


class Context:
    """One llama context. Only its owner thread may call `decode`."""

    def __init__(self, model: LlamaModel, p: ContextParams) -> None:
        cp = _lc.llama_context_default_params()
        set_fields(
            cp,
            n_ctx=p.n_ctx,
            n_batch=p.n_batch,
            n_ubatch=p.n_ubatch,
            n_seq_max=p.n_seq_max,
            n_threads=p.n_threads,
            n_threads_batch=p.n_threads_batch,
            embeddings=p.embeddings,
            offload_kqv=p.offload_kqv,
            op_offload=p.op_offload,
            no_perf=not p.profiling,
            # Text: each sequence gets its own n_ctx / n_seq_max window (a slot is a
            # slot). Embeddings: one shared stream, so llama.cpp keeps every input of a
            # batch in one micro-batch; split per stream, pooling would see only part of
            # an input.
            kv_unified=p.embeddings or p.unified_kv,
        )
        if p.pooling is not None:
            set_fields(cp, pooling_type=POOLING[p.pooling])
        if p.flash_attention is not None:
            enabled = _lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            disabled = _lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            set_fields(cp, flash_attn_type=enabled if p.flash_attention else disabled)
        recent_log_errors()
        ptr = _lc.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise RuntimeError("; ".join(recent_log_errors()) or "llama.cpp could not create it")
        self._ptr = ptr
        self.model = model
        self.n_ctx = int(_lc.llama_n_ctx(ptr))
        self.n_ctx_seq = int(_lc.llama_n_ctx_seq(ptr))
        self.n_batch = int(_lc.llama_n_batch(ptr))
        self.n_ubatch = int(_lc.llama_n_ubatch(ptr))
        self.n_seq_max = int(_lc.llama_n_seq_max(ptr))
        self.pooling = POOLING_NAMES.get(int(_lc.llama_pooling_type(ptr)), "none")
        self._memory = _lc.llama_get_memory(ptr)
        self.threads = max(p.n_threads, p.n_threads_batch)
        self._cores = CPU.need(self.threads)  # what each compute call takes from CPU
        self._one: Batch | None = None  # decode_token's batch, made at its first call
        self._row_view: tuple[int, npt.NDArray[np.float32]] | None = None  # logits_row's
        self._rows_view: tuple[int, npt.NDArray[np.float32]] | None = None  # logits_rows'
        try:
            self._pools = attach_threadpools(ptr, p.n_threads, p.n_threads_batch)
        except BaseException:
            _lc.llama_free(ptr)
            raise
        CPU.join()

    @property
    def ptr(self) -> Any:
        return self._ptr

    def close(self) -> None:
        if self._one is not None:
            self._one.close()
            self._one = None
        if self._ptr:
            _lc.llama_free(self._ptr)
            self._ptr = None
            CPU.leave()
        for pool in self._pools:  # after the context that computes with them
            pool.close()
        self._pools = []

    def decode_token(self, token: int, pos: int, seq_id: int) -> int:
        """Decode one token of one sequence, with its logits at output index 0: a lone
        generating request's step, in one call instead of a batch's clear, add and decode."""
        one = self._one
        if one is None:
            one = self._one = Batch(1)
            one.add(token, pos, seq_id, True)
        one.set_single(token, pos, seq_id)
        return self.decode(one)

    def decode(self, batch: Batch) -> int:
        # Read without the lock: a context created while this decode runs may compute
        # beside it until it returns (however long a prefill that is), which costs
        # speed, never correctness; the next decode takes its turn.
        if not CPU.shared:
            return int(_lc.llama_decode(self._ptr, batch.raw))
        # take/give rather than `CPU.use`: a generator context manager costs ~2 µs a
        # token, a tenth of a tiny model's whole per-token overhead.
        CPU.take(self._cores)
        try:
            return int(_lc.llama_decode(self._ptr, batch.raw))
        finally:
            if CPU.wanted:  # read unlocked: a waiter that comes later meets a few ms of polling
                self.sleep_workers()
            CPU.give(self._cores)

    def sleep_workers(self) -> None:
        """Before giving the cores to another context: polling workers would spin on
        into its turn and stall its threads at every barrier."""
        for pool in self._pools:
            pool.pause()

    def encode(self, batch: Batch) -> int:
        """Run an encoder-decoder model's encoder over `batch`. llama.cpp keeps one encoder
        output per context, replaced by every call, and the decoder's cross-attention reads
        the rows whose sequence id matches its own. The batch must fit in one micro-batch
        (`n_ubatch`): a larger one trips an assert that aborts the process."""
        if batch.n > self.n_ubatch:
            raise ValueError(f"an encoder batch holds at most {self.n_ubatch} tokens")
        with CPU.use(self.threads):
            try:
                return int(_lc.llama_encode(self._ptr, batch.raw))
            finally:
                self.sleep_workers()

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        if not self._memory:  # encoder-only models keep no KV memory
            return True
        return bool(_lc.llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_span(self, seq_id: int) -> tuple[int, int]:
        """(lowest, highest) position the memory holds for the sequence, every one in
        between included; (-1, -1) when it holds none. The lowest is above 0 once a
        sliding-window cache has dropped the oldest cells."""
        if not self._memory:
            return -1, -1
        return (
            int(_lc.llama_memory_seq_pos_min(self._memory, seq_id)),
            int(_lc.llama_memory_seq_pos_max(self._memory, seq_id)),
        )

    def seq_state(self, seq_id: int) -> bytes:
        """One sequence's KV state, as bytes (host memory)."""
        size = int(_lc.llama_state_seq_get_size(self._ptr, seq_id))
        buf = (ctypes.c_uint8 * size)()
        written = int(_lc.llama_state_seq_get_data(self._ptr, buf, size, seq_id))
        # One memcpy; slicing a ctypes array would build a Python int per KV byte.
        return ctypes.string_at(buf, written)

    def set_seq_state(self, seq_id: int, state: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return int(_lc.llama_state_seq_set_data(self._ptr, buf, len(state), seq_id)) > 0

    def clear_memory(self) -> None:
        if self._memory:
            _lc.llama_memory_clear(self._memory, True)

    def logits_row(self, i: int) -> npt.NDArray[np.float32]:
        """The raw logits of batch entry `i` of the last decode, as a view (no copy):
        valid only until the next decode. The view of the last row asked for is kept
        and handed out again while llama.cpp's row sits at the same address (a lone
        request asks for row 0 every token; making a view costs ~80 us in situ)."""
        addr = _logits_ith_address(self._ptr, i)
        if not addr:
            raise RuntimeError(f"llama.cpp returned no logits for batch entry {i}")
        kept = self._row_view
        if kept is not None and kept[0] == addr:
            return kept[1]
        view = _floats_at(addr, self.model.n_vocab)
        self._row_view = (addr, view)
        return view

    def logits_rows(self, indices: Sequence[int]) -> tuple[npt.NDArray[np.float32], list[int]]:
        """A (rows, n_vocab) view (no copy) over the logits of the last decode, and the
        row in it of each batch entry in `indices`: valid only until the next decode.
        llama.cpp keeps one row per output, in an order of its own (llama_get_logits_ith
        maps a batch entry to its row), so the rows are found through that mapping. The
        view is kept while the buffer stays where it is (making one costs ~50 us in situ,
        a decode having just evicted the caches), so it may hold more rows than this
        decode wrote: read only the rows returned. (llama.cpp reallocates the buffer
        only to grow it, so an unchanged address holds at least the rows kept.)"""
        base = _logits_address(self._ptr)
        if not base:
            raise RuntimeError("llama.cpp returned no logits")
        stride = self.model.n_vocab * ctypes.sizeof(ctypes.c_float)
        rows: list[int] = []
        for i in indices:
            addr = _logits_ith_address(self._ptr, i)
            if not addr:
                raise RuntimeError(f"llama.cpp returned no logits for batch entry {i}")
            rows.append((addr - base) // stride)
        n_rows = max(rows) + 1 if rows else 0
        kept = self._rows_view
        if kept is not None and kept[0] == base and len(kept[1]) >= n_rows:
            return kept[1], rows
        view = _floats_at(base, n_rows * self.model.n_vocab).reshape(n_rows, self.model.n_vocab)
        self._rows_view = (base, view)
        return view, rows

    def embedding_seq(self, seq_id: int, n_embd: int) -> list[float]:
        ptr = _lc.llama_get_embeddings_seq(self._ptr, seq_id)
        if not ptr:
            raise RuntimeError("llama.cpp returned no pooled embedding for the sequence")
        return ptr[:n_embd]  # type: ignore[no-any-return]

    def embedding_ith(self, i: int, n_embd: int) -> list[float]:
        ptr = _lc.llama_get_embeddings_ith(self._ptr, i)
        if not ptr:
            raise RuntimeError("llama.cpp returned no embedding for the token")
        return ptr[:n_embd]  # type: ignore[no-any-return]

    def perf(self) -> dict[str, float]:
        d = _lc.llama_perf_context(self._ptr)
        return {
            "load_ms": d.t_load_ms,
            "prompt_eval_ms": d.t_p_eval_ms,
            "eval_ms": d.t_eval_ms,
            "prompt_eval_tokens": float(d.n_p_eval),
            "eval_tokens": float(d.n_eval),
        }


class Batch:
    """A reusable `llama_batch` with room for `capacity` tokens, one seq id each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = _lc.llama_batch_init(capacity, 0, 1)
        self._token = self.raw.token
        self._pos = self.raw.pos
        self._n_seq_id = self.raw.n_seq_id
        self._seq_id = self.raw.seq_id
        self._logits = self.raw.logits
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, output: bool) -> int:
        """Append one token; returns its index in the batch (for sampling/embeddings).

        The arrays behind `raw` are C memory of `capacity` entries: one more would be
        written past them, so a full batch raises instead."""
        i = self.n
        if i >= self.capacity:
            raise OverflowError(f"llama_batch is full ({self.capacity} tokens)")
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq_id[i] = 1
        self._seq_id[i][0] = seq_id
        self._logits[i] = output
        self.n = i + 1
        self.raw.n_tokens = self.n
        return i

    def set_single(self, token: int, pos: int, seq_id: int) -> None:
        """Make the batch hold just this token, with the output flag of its first entry."""
        self._token[0] = token
        self._pos[0] = pos
        self._seq_id[0][0] = seq_id
        self.n = self.raw.n_tokens = 1

    def close(self) -> None:
        if self.raw is not None:
            _lc.llama_batch_free(self.raw)
            self.raw = None


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    order: tuple[str, ...]
    logit_bias: Mapping[int, float]
    grammar: str | None
    # Non-empty: the grammar is lazy, free text until one of these tokens is sampled.
    # A trigger token is fed to the grammar as its first input, so the grammar must
    # start with that token's text (a pattern trigger could replay text it rejects,
    # and llama.cpp aborts the process on that).
    grammar_trigger_tokens: tuple[int, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # How many generated tokens the frequency/presence counts look back over; the
    # endpoint passes the slot's context size, so they count the whole response.
    penalty_window: int = 0


class _Candidates:
    """A reusable llama_token_data array over the whole vocabulary, as
    llama_sampler_sample builds one from a row of logits."""

    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def __init__(self, n_vocab: int) -> None:
        assert self._DTYPE.itemsize == ctypes.sizeof(_lc.llama_token_data)
        self._fresh = np.zeros(n_vocab, dtype=self._DTYPE)  # ids in order, p = 0
        self._fresh["id"] = np.arange(n_vocab, dtype=np.int32)
        self._data = self._fresh.copy()
        self._pointer = self._data.ctypes.data_as(ctypes.POINTER(_lc.llama_token_data))
        self._array = _lc.llama_token_data_array()
        self._one_data = (_lc.llama_token_data * 1)()
        self._one = _lc.llama_token_data_array(self._one_data, 1, -1, False)

    def apply(self, chain: Any, logits: npt.NDArray[np.float32]) -> int | None:
        """Run `chain` over `logits`: the token it selects, or None if that token was
        left at -inf (all were: nothing is admitted)."""
        self._load(logits)
        return self.finish(chain, 0)

    def greedy(self, chain: Any, grammar_at: int, logits: npt.NDArray[np.float32]) -> int | None:
        """What `chain` (stages before `grammar_at`, its grammar, then greedy) selects,
        without the grammar's pass over every token when it admits the argmax.

        The stages before the grammar (logit bias, penalties) only move logits. If the
        grammar admits the first best token, greedy on the masked array takes it too:
        the mask only lowers others. llama.cpp's server samples before the grammar the
        same way. Otherwise, or on a NaN, the rest of the chain runs over them all."""
        array = self._load(logits)
        for stage in range(grammar_at):
            _lc.llama_sampler_apply(_lc.llama_sampler_chain_get(chain, stage), ctypes.byref(array))
        values = self._data["logit"]
        best = int(values.argmax())  # the first best, as greedy takes; numpy's first NaN
        value = float(values[best])
        if value == value and value != -math.inf:
            token = int(self._data["id"][best])
            self._one_data[0] = _lc.llama_token_data(token, value, 0.0)
            one = self._one
            one.size, one.selected, one.sorted = 1, -1, False
            grammar = _lc.llama_sampler_chain_get(chain, grammar_at)
            _lc.llama_sampler_apply(grammar, ctypes.byref(one))
            if self._one_data[0].logit != -math.inf:
                return token
        return self.finish(chain, grammar_at)

    def finish(self, chain: Any, first: int) -> int | None:
        """Run `chain`'s stages from `first` on over the loaded array, as `apply` does."""
        array = self._array
        for stage in range(first, _lc.llama_sampler_chain_n(chain)):
            _lc.llama_sampler_apply(_lc.llama_sampler_chain_get(chain, stage), ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        chosen = array.data[array.selected]  # a stage may have moved `data` elsewhere
        return None if chosen.logit == -math.inf else int(chosen.id)

    def _load(self, logits: npt.NDArray[np.float32]) -> Any:
        data = self._data
        data[:] = self._fresh  # one copy, where three strided field writes cost twice as much
        data["logit"] = logits
        array = self._array
        array.data = self._pointer
        array.size, array.selected, array.sorted = len(data), -1, False
        return array


class Sampler:
    """A llama.cpp sampler chain for one request."""

    fast_grammar = True  # a greedy grammar row checks the argmax first (tests compare)

    def __init__(self, model: LlamaModel, s: SamplerSettings, prompt: Sequence[int] = ()) -> None:
        self.settings = s  # batch_sampling decides from these whether the chain is needed
        self._candidates: _Candidates | None = None  # set with a grammar
        self._grammar_at = 0  # the grammar's place in the chain
        self._greedy = False  # the chain ends in greedy (after its grammar, if any)
        grammar = s.grammar.encode() if s.grammar is not None else None  # before any C
        chain = _lc.llama_sampler_chain_init(_lc.llama_sampler_chain_default_params())
        self._ptr = chain
        add = _lc.llama_sampler_chain_add
        if s.logit_bias:
            items = (_lc.llama_logit_bias * len(s.logit_bias))(
                *[_lc.llama_logit_bias(token=t, bias=b) for t, b in s.logit_bias.items()]
            )
            add(chain, _lc.llama_sampler_init_logit_bias(model.n_vocab, len(s.logit_bias), items))
        if s.repeat_penalty != 1.0:
            repeat = _lc.llama_sampler_init_penalties(
                model.n_vocab, REPEAT_WINDOW, s.repeat_penalty, 0.0, 0.0
            )
            # As llama.cpp's server and CLI do, the window starts over the prompt's end:
            # a reply's first tokens are penalised for repeating what it answers. Image
            # placeholders (ids outside the vocabulary) are not text, and are skipped.
            tail = [t for t in prompt if 0 <= t < model.n_vocab][-REPEAT_WINDOW:]
            for token in tail:
                _lc.llama_sampler_accept(repeat, token)
            add(chain, repeat)
        if s.frequency_penalty or s.presence_penalty:
            # OpenAI counts every token sampled so far in the response. llama.cpp keeps
            # the last `penalty_last_n` accepted tokens, and in this build both 0 and -1
            # disable the sampler (-1 means "context size" only in llama.cpp's CLI
            # layer; checked by running it), so the window is passed explicitly. The
            # chain only ever accepts sampled tokens, never the prompt, as OpenAI defines it.
            add(
                chain,
                _lc.llama_sampler_init_penalties(
                    model.n_vocab,
                    max(1, s.penalty_window),
                    1.0,
                    s.frequency_penalty,
                    s.presence_penalty,
                ),
            )
        if s.grammar is not None:
            if s.grammar_trigger_tokens:
                triggers = (_lc.llama_token * len(s.grammar_trigger_tokens))(
                    *s.grammar_trigger_tokens
                )
                g = _lc.llama_sampler_init_grammar_lazy_patterns(
                    model.vocab, grammar, b"root", None, 0, triggers, len(triggers)
                )
            else:
                g = _lc.llama_sampler_init_grammar(model.vocab, grammar, b"root")
            if not g:
                self.close()
                raise ValueError("; ".join(recent_log_errors()) or "the grammar does not parse")
            self._grammar_at = int(_lc.llama_sampler_chain_n(chain))
            add(chain, g)
            self._candidates = _Candidates(model.n_vocab)
        if s.temperature <= 0.0:
            add(chain, _lc.llama_sampler_init_greedy())
            self._greedy = True
            return
        for stage in s.order:
            if stage == "top_k" and s.top_k > 0:
                add(chain, _lc.llama_sampler_init_top_k(s.top_k))
            elif stage == "top_p" and s.top_p < 1.0:
                add(chain, _lc.llama_sampler_init_top_p(s.top_p, 1))
            elif stage == "min_p" and s.min_p > 0.0:
                add(chain, _lc.llama_sampler_init_min_p(s.min_p, 1))
            elif stage == "temperature":
                add(chain, _lc.llama_sampler_init_temp(s.temperature))
        add(chain, _lc.llama_sampler_init_dist(s.seed))

    def sample(self, ctx: Context, index: int) -> int:
        """The next token, accepted into the chain's state; NO_TOKEN when the grammar
        admits none (every candidate it leaves is at -inf, a logit_bias's or its own)."""
        if self._candidates is None:
            return int(_lc.llama_sampler_sample(self._ptr, ctx.ptr, index))
        # llama_sampler_sample, with a look before the accept: it would pick a token
        # anyway (greedy the first, dist the last), and the grammar's accept of a token
        # it rejects aborts the process (GGML_ABORT, or a C++ exception through C).
        logits = ctx.logits_row(index)
        if self._greedy and self.fast_grammar:
            chosen = self._candidates.greedy(self._ptr, self._grammar_at, logits)
        else:
            chosen = self._candidates.apply(self._ptr, logits)
        if chosen is None:
            return NO_TOKEN
        _lc.llama_sampler_accept(self._ptr, chosen)
        return chosen

    def close(self) -> None:
        if self._ptr:
            _lc.llama_sampler_free(self._ptr)
            self._ptr = None
