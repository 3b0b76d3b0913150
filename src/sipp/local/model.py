"""Load a GGUF file into a llama.cpp model and context, from a descriptor.

All checks that can be done before llama.cpp touches the file happen here, so
a bad path or a non-GGUF file is a clear `ModelLoadError`, not a C-level log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .._errors import (
    BackendUnavailableError,
    InvalidConfigError,
    ModelLoadError,
    UnsupportedOperationError,
)
from .._runtime_config import ContextRuntimeConfig, NativeRuntimeConfig
from . import _llama, _mtmd, huge_pages
from .chat_template import ChatTemplate

__all__ = ["BACKENDS", "LoadedModel", "load_model", "resolve_backend"]

logger = logging.getLogger("sipp.local")

BACKENDS = ("auto", "cpu", "cuda", "vulkan", "metal")
BACKEND_ENV = "SIPP_PYTHON_BACKEND"
DEFAULT_N_CTX = 4096
GGUF_MAGIC = b"GGUF"
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ: a context holds at most this many sequences


def resolve_backend(requested: str | None = None) -> str:
    """The backend to use: the argument, else `SIPP_PYTHON_BACKEND`, else auto.

    Returns `cpu` or a GPU backend name that the installed build has.
    """
    name = (requested or os.environ.get(BACKEND_ENV, "") or "auto").strip().lower()
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {name!r} (from {'argument' if requested else BACKEND_ENV}); "
            f"choose one of {', '.join(BACKENDS)}"
        )
    installed = _llama.installed_backends()
    if name == "auto":
        gpus = [b for b in installed if b != "cpu"]
        return gpus[0] if gpus else "cpu"
    if name not in installed:
        raise BackendUnavailableError(
            f"backend {name!r} is not in the installed llama-cpp-python build "
            f"(installed: {', '.join(installed)}); see README 'GPU builds'"
        )
    return name


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (expected magic 'GGUF', found {head!r})")


def batch_sizes(ctx_cfg: ContextRuntimeConfig, n_ctx: int, n_parallel: int) -> tuple[int, int]:
    """(n_batch, n_ubatch) for a load, or `InvalidConfigError` for sizes llama.cpp would
    refuse or silently shrink. `n_batch` below `n_parallel` is fine: the scheduler lets
    generating sequences take turns when more of them run than one batch holds."""
    if n_parallel > MAX_PARALLEL:
        raise InvalidConfigError(
            f"ContextRuntimeConfig.n_parallel must be <= {MAX_PARALLEL} "
            f"(llama.cpp's sequence limit), got {n_parallel}"
        )
    embeddings = bool(ctx_cfg.embeddings)
    total = n_ctx * n_parallel
    n_batch = ctx_cfg.n_batch or min(min(n_ctx, 2048) if embeddings else 512, total)
    if n_batch > total:
        raise InvalidConfigError(
            f"ContextRuntimeConfig.n_batch ({n_batch}) exceeds the whole context "
            f"(n_ctx {n_ctx} x n_parallel {n_parallel} = {total} tokens)"
        )
    # Non-causal embedding models must see a whole input in one micro-batch.
    n_ubatch = ctx_cfg.n_ubatch or (n_batch if embeddings else min(n_batch, 512))
    if n_ubatch > n_batch:
        raise InvalidConfigError(
            f"ContextRuntimeConfig.n_ubatch ({n_ubatch}) must be <= n_batch ({n_batch}): "
            "a micro-batch is a slice of a batch"
        )
    if embeddings and n_ubatch < n_batch:
        raise InvalidConfigError(
            f"ContextRuntimeConfig.n_ubatch ({n_ubatch}) must equal n_batch ({n_batch}) "
            "with embeddings=True: pooling must see a whole input in one micro-batch"
        )
    return n_batch, n_ubatch


@dataclass
class LoadedModel:
    path: Path
    backend: str
    model: _llama.LlamaModel
    context: _llama.Context
    chat_template: ChatTemplate | None
    embeddings: bool
    n_batch: int  # tokens one decode step may carry (the context may reserve more)
    template_problem: str | None = None
    projector: _mtmd.Projector | None = None  # set when the load names a vision projector

    def close(self) -> None:
        if self.projector is not None:
            self.projector.close()
        self.context.close()
        self.model.close()


def load_model(path: Path, config: NativeRuntimeConfig, backend: str | None = None) -> LoadedModel:
    """Load the model and one context sized for `context.n_parallel` slots."""
    _check_gguf_file(path)
    chosen = resolve_backend(backend)
    placement, ctx_cfg = config.placement, config.context
    on_cpu = chosen == "cpu"
    # An explicit `cpu` request switches every GPU-only feature off (the spec's
    # policy); `auto` that lands on the CPU keeps llama.cpp's own defaults.
    forced_cpu = (
        on_cpu and (backend or os.environ.get(BACKEND_ENV, "auto")).strip().lower() == "cpu"
    )
    if on_cpu and placement.gpu_layers not in (None, 0):
        raise InvalidConfigError(
            "PlacementRuntimeConfig.gpu_layers must be 0 or unset with the cpu backend"
        )
    use_extra_bufts = placement.use_extra_bufts
    if use_extra_bufts is None:
        # llama.cpp's AMX repacking crashes on first decode on some hosts (SIGSEGV
        # in ggml_backend_amx_mul_mat); it costs ~5% decode speed to avoid it.
        use_extra_bufts = not _llama.cpu_has_amx()
    use_mmap = placement.use_mmap
    thp = on_cpu and huge_pages.available()
    if use_mmap is None and thp and huge_pages.fits_in_memory(path):
        use_mmap = False  # read into memory, where its pages can be huge (see huge_pages)
    params = _llama.ModelParams(
        gpu_layers=0
        if on_cpu
        else (placement.gpu_layers if placement.gpu_layers is not None else -1),
        main_gpu=placement.main_gpu or 0,
        use_mmap=use_mmap,
        use_mlock=bool(placement.use_mlock),
        use_extra_bufts=use_extra_bufts,
    )
    try:
        with huge_pages.collapsed(thp):
            model = _llama.LlamaModel(path, params)
    except RuntimeError as exc:
        raise ModelLoadError(f"llama.cpp could not load {path}: {exc}") from exc

    try:
        embeddings = bool(ctx_cfg.embeddings)
        if embeddings and model.encoder_decoder:
            raise InvalidConfigError(
                f"{path.name} is an encoder-decoder model: it generates text (query), "
                "this runtime computes no embeddings with it (drop embeddings=True)"
            )
        arch = model.meta("general.architecture")
        if embeddings and ctx_cfg.pooling is None and model.meta(f"{arch}.pooling_type") == "4":
            raise InvalidConfigError(
                f"{path.name} declares rank pooling: it is a reranker, whose output is a "
                "relevance score, not an embedding; set ContextRuntimeConfig.pooling "
                "('mean', 'cls', 'last' or 'none') to embed with it anyway"
            )
        n_parallel = ctx_cfg.n_parallel or 1
        n_ctx = ctx_cfg.n_ctx or min(DEFAULT_N_CTX, model.n_ctx_train or DEFAULT_N_CTX)
        n_batch, n_ubatch = batch_sizes(ctx_cfg, n_ctx, n_parallel)
        threads = ctx_cfg.n_threads or max(1, os.cpu_count() or 1)
        cparams = _llama.ContextParams(
            n_ctx=n_ctx * n_parallel,
            # llama.cpp reserves an output row per sequence at creation and aborts the
            # process if n_batch is below n_seq_max; steps still hold at most `n_batch`.
            n_batch=max(n_batch, n_parallel),
            n_ubatch=n_ubatch,
            n_seq_max=n_parallel,
            n_threads=threads,
            n_threads_batch=ctx_cfg.n_threads_batch or threads,
            embeddings=embeddings,
            pooling=ctx_cfg.pooling if embeddings else None,
            # On CPU llama.cpp's flash attention doubles the cost of prefilling a short
            # suffix onto a long cached prefix (measured 150 vs 72 ms for 16 tokens on
            # 512), and decode is unchanged: off unless asked for.
            flash_attention=False
            if on_cpu and not ctx_cfg.flash_attention
            else ctx_cfg.flash_attention,
            offload_kqv=False if on_cpu else (ctx_cfg.offload_kqv is not False),
            op_offload=not on_cpu,
            profiling=bool(config.observability.backend_profiling),
            unified_kv=model.encoder_decoder,
        )
        if forced_cpu and ctx_cfg.flash_attention:
            raise InvalidConfigError(
                "ContextRuntimeConfig.flash_attention cannot be on with the explicit cpu backend"
            )
        try:
            # Its KV cache is filled (cleared) as it is made, its compute buffer by the
            # first decode: a step over many sequences reads their cells and activations
            # as well as the weights, so these go in huge pages too (see the huge-pages
            # trap in docs/architecture.md).
            with huge_pages.collapsed(thp, untouched=True):
                context = _llama.Context(model, cparams)
        except RuntimeError as exc:
            raise ModelLoadError(f"llama.cpp could not create a context for {path}: {exc}") from exc
    except BaseException:
        model.close()
        raise

    try:
        # The vision encoder keeps llama.cpp's own choice unless the load sets one: on
        # CPU its flash attention encodes a 224x224 image in 7.5 ms instead of 12.4
        # (bench/vision_prefill.py), unlike the text context's (see above).
        projector = _load_projector(
            config, model, chosen, threads, embeddings, ctx_cfg.flash_attention
        )
    except BaseException:
        context.close()
        model.close()
        raise
    template_src = model.chat_template()
    template, problem = None, None
    if template_src:
        bos = model.token_text(model.bos()) if model.bos() >= 0 else ""
        eos = model.token_text(model.eos()) if model.eos() >= 0 else ""
        try:
            template = ChatTemplate(template_src, bos_token=bos, eos_token=eos)
        except UnsupportedOperationError as exc:  # chat fails later; query still works
            problem = exc.message
    logger.info(
        "loaded %s (%s) backend=%s n_ctx=%d x %d slots",
        path.name,
        model.description(),
        chosen,
        cparams.n_ctx // n_parallel,
        n_parallel,
    )
    return LoadedModel(
        path, chosen, model, context, template, embeddings, n_batch, problem, projector
    )


def _load_projector(
    config: NativeRuntimeConfig,
    model: _llama.LlamaModel,
    backend: str,
    threads: int,
    embeddings: bool,
    flash_attention: bool | None,
) -> _mtmd.Projector | None:
    """The vision projector the multimodal group names, checked against the text model."""
    mm = config.multimodal
    if mm.projector_path is None:
        return None
    if mm.use_gpu and backend == "cpu":
        raise InvalidConfigError(
            "MultimodalRuntimeConfig.use_gpu=True needs a GPU backend; this load runs on "
            "the cpu backend (leave it unset or False)"
        )
    if embeddings or model.encoder_decoder:
        raise InvalidConfigError(
            "a vision projector needs a decoder-only chat model loaded for text generation"
        )
    path = Path(mm.projector_path).expanduser()
    _check_gguf_file(path)
    try:
        projector = _mtmd.Projector(
            path,
            model,
            n_threads=threads,
            use_gpu=bool(mm.use_gpu),
            flash_attention=flash_attention,
            image_min_tokens=mm.image_min_tokens,
            image_max_tokens=mm.image_max_tokens,
        )
    except RuntimeError as exc:
        raise ModelLoadError(
            f"llama.cpp could not load the projector {path} for this model: {exc}"
        ) from exc
    if not projector.vision:
        projector.close()
        raise ModelLoadError(f"{path} is not a vision projector (this runtime reads images only)")
    if projector.mrope:
        projector.close()
        raise UnsupportedOperationError(
            f"{path} needs M-RoPE positions (the Qwen2-VL family), which this runtime "
            "does not support yet"
        )
    return projector
