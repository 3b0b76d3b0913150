"""The local engine: one worker thread owns a llama context and its slots.

Each step builds one `llama_batch` from the next token of every generating
sequence (more than `n_batch` of them take turns) plus prefill chunks of waiting
prompts (within `n_batch`, each prompt capped by `prefill_chunk_size`), decodes it once, then samples every sequence
that produced logits. Requests join and leave between steps (continuous
batching); a cancelled request leaves at the next step and frees its slot.

Callers never touch llama.cpp state: `submit_*` validates and tokenizes in the
caller's thread, then enqueues. Only the worker decodes, samples and edits KV.
If the worker dies of an unexpected error, every run ends with a typed error,
`failure` says why, and new submits get `UnavailableError` (503 on a gateway).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from .._channel import RunChannel
from .._errors import (
    ClientClosedError,
    ContextOverflowError,
    ExecutionError,
    InvalidRequestError,
    OverloadedError,
    SippError,
    UnavailableError,
)
from .._runtime_config import SAMPLER_NAMES, NativeRuntimeConfig, SamplingRuntimeConfig
from .._types import (
    FinishReason,
    LocalStats,
    SippEmbeddingResponse,
    SippTextResponse,
    TokenBatch,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from . import _llama
from .batch_sampling import RowSampler, greedy_token, row_sampler, sample_rows
from .kv_cache import EmbedMemo, Snapshot, SnapshotStore, common_prefix
from .logprobs import token_logprob
from .model import LoadedModel
from .text_stream import TextStream
from .tool_parser import ToolCallParser
from .vision import MediaPrompt

__all__ = ["EmbedJob", "Engine", "TextJob"]

logger = logging.getLogger("sipp.local")

DEFAULT_MAX_QUEUED = 256
SMALL_VOCAB = 16384  # below this, a lone greedy row samples faster on its chain
SAMPLED_BATCH_VOCAB = 100_000  # below this, sampled rows are cheaper on their chains
MIN_SNAPSHOT_TOKENS = 16  # shorter sequences are cheaper to prefill again than to store
# A job copies a sibling's prompt prefix only when it shares at least this many tokens
# more than its slot kept, or an image: copying waits a step for the sibling's decode,
# which a few tokens prefilled in that same decode do not repay (prompts that begin
# with "The"), but an image encoded again by each copy does.
MIN_SHARED_TOKENS = 16
# An engine with no request running that gets a chat waits while more keep coming, each
# within BURST_GAP_S of the last, for at most BURST_MAX_S (see `Engine._await_burst`).
BURST_GAP_S = 0.001
BURST_MAX_S = 0.01
# Streamed text may wait this long for its reader to come back on its own rather than
# wake it per token (RunChannel.push's `hold_s`; docs/architecture.md says why 50 ms).
STREAM_HOLD_S = 0.05
_DEFAULT_SAMPLING = SamplingRuntimeConfig(
    samplers=SAMPLER_NAMES,
    seed=None,
    top_k=40,
    top_p=0.95,
    min_p=0.05,
    temperature=0.8,
    repeat_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    logit_bias={},
)


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # exactly what the KV holds
    context_key: str | None = None
    last_used: float = 0.0
    busy: bool = False


@dataclass(eq=False)
class TextJob:
    channel: RunChannel[SippTextResponse]
    prompt: list[int]
    sampler: _llama.Sampler
    max_new: int | None
    stream: TextStream
    emit: bool
    context_key: str | None
    top_logprobs: int | None = None  # None: logprobs not requested; else the top-k size
    tools: ToolCallParser | None = None  # set when the reply may hold tool calls
    # (sibling, n): this job waits for `sibling` to prefill its first n prompt tokens,
    # the same as ours, and then copies them instead of computing them again.
    share: tuple[TextJob, int] | None = None
    # Encoder-decoder models: the tokenized prompt, which the encoder reads; `prompt` is
    # then the decoder's own start ([decoder-start token]).
    encoder_prompt: list[int] | None = None
    # Vision chat: where `prompt` holds image placeholders, and the image chunks.
    media: MediaPrompt | None = None
    # Set when the job starts: its rows are sampled with the step's others, without
    # the llama.cpp chain (None: the chain samples them, see batch_sampling).
    fast: RowSampler | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    slot: _Slot | None = None
    prefilled: int = 0  # prompt tokens already in the KV
    cached: int = 0
    generated: int = 0
    last_token: int = -1
    out_index: int = -1
    batch_seq: itertools.count[int] = field(default_factory=itertools.count)
    # Tokens (and their logprobs) whose text the stream still holds back.
    held_ids: list[int] = field(default_factory=list)
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # those released so far
    t_admit: float = 0.0
    t_first: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def close(self) -> None:
        """Free what the job holds outside Python: its sampler and its image chunks."""
        self.sampler.close()
        if self.media is not None:
            self.media.close()

    def whole_images(self, n: int) -> int:
        """A prefix length of `n` or less that cuts no image in two."""
        return self.media.floor(n) if self.media is not None else n

    @property
    def prompt_tokens(self) -> int:
        """What the caller's prompt cost: the encoder's input on encoder-decoder models."""
        return len(self.encoder_prompt if self.encoder_prompt is not None else self.prompt)


@dataclass(eq=False)
class EmbedJob:
    channel: RunChannel[SippEmbeddingResponse]
    tokens: list[int]
    normalize: bool
    context_key: str | None = None


class Engine:
    """Owns one loaded model; runs text or embedding jobs on its worker thread."""

    def __init__(self, loaded: LoadedModel, config: NativeRuntimeConfig, name: str) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.ctx = loaded.context
        sched = config.scheduler
        n_slots = self.ctx.n_seq_max
        self.n_ctx_slot = self.ctx.n_ctx_seq
        self.encoder = self.model.encoder_decoder
        if self.encoder:
            # One KV stream for every slot (see ContextParams.unified_kv): each slot gets
            # its share, so all of them together never overflow it.
            self.n_ctx_slot = self.ctx.n_ctx // self.ctx.n_seq_max
        if self.model.n_positions is not None:
            # A learned position table ends there; a sequence past it would abort the
            # process (embeddings share one KV stream, whose n_ctx_seq is all of it).
            self.n_ctx_slot = min(self.n_ctx_slot, self.model.n_positions)
        self.max_running = min(sched.max_running_requests or n_slots, n_slots)
        if sched.continuous_batching is False:
            self.max_running = 1
        self.max_queued = (
            DEFAULT_MAX_QUEUED if sched.max_queued_requests is None else sched.max_queued_requests
        )
        self.chunk_cap = sched.prefill_chunk_size or 0
        cache_mode = config.cache.mode or "live_slot_prefix"
        # Encoder-decoder: the decoder's KV depends on the encoder's input, not on the
        # decoder tokens a prefix match compares, so nothing is reused across requests.
        self.reuse_prefix = cache_mode != "off" and not self.encoder
        self.snapshots = (
            SnapshotStore(
                config.cache.max_snapshot_entries
                if config.cache.max_snapshot_entries is not None
                else 16,
                config.cache.max_snapshot_bytes
                if config.cache.max_snapshot_bytes is not None
                else 256 << 20,
            )
            if cache_mode == "snapshot" and not self.encoder
            else None
        )
        self.sampling = config.sampling.merged_over(_DEFAULT_SAMPLING)
        self.metrics_on = bool(config.observability.runtime_metrics)
        self.profiling = bool(config.observability.backend_profiling)
        self._slots = [_Slot(i) for i in range(n_slots)]
        self.embed_memo = EmbedMemo()
        self._queue: deque[TextJob | EmbedJob] = deque()
        self._active: list[TextJob] = []
        self._cond = threading.Condition()
        self._closing = False
        self._failure: str | None = None
        self._embedding: list[EmbedJob] = []  # the embed step in progress, for _crashed
        self._batch = _llama.Batch(loaded.n_batch)
        self._turn = 0  # rotation offset when more sequences generate than n_batch holds
        self._prefill_turn = False  # a one-token batch's turns between prompts and generation
        self._waiters: list[TextJob] = []  # jobs with a pending `share`
        self._can_share = self.reuse_prefix  # off for good if a memory cannot trim a copy
        # False: every row goes through its llama.cpp sampler chain (the reference path
        # the batch sampler is tested against).
        self.batch_sampling = True
        # A lone greedy row: its chain gives the same token (tested) and costs ~1 ns per
        # vocabulary entry, the batch path ~14 us plus a quarter of that: the chain is
        # cheaper below ~13k entries (a tiny test model's 212: 1.2 against 14 us), the
        # batch path above (SmolLM2's 49,152: 25 against 59 us).
        self._small_vocab = self.model.n_vocab < SMALL_VOCAB
        # A sampled row (temperature > 0): the batch sampler's numpy costs about the same
        # at any vocabulary size, the chain grows with it. In the engine, a decode having
        # just evicted the caches, per row and step: SmolLM2 (49,152 entries) chain 210 us
        # against 547 alone, 129 against 212 in a step of 8; Qwen2.5 (151,936) chain 1,387
        # against 591 alone, 329 against 304 in 8 (BENCHMARKS.md, session 18).
        self.sampled_rows_batched = self.model.n_vocab >= SAMPLED_BATCH_VOCAB
        # False: a lone generating job goes through the step loop like any other (the
        # reference path `_generate_alone` is tested against).
        self.lone_loop = True
        self.burst_gap_s, self.burst_max_s = BURST_GAP_S, BURST_MAX_S
        self._counters: dict[str, float] = dict.fromkeys(
            (
                "requests",
                "completed",
                "failed",
                "cancelled",
                "rejected",
                "prompt_tokens",
                "cached_prompt_tokens",
                "generated_tokens",
                "prefill_ms",
                "decode_ms",
                "steps",
                "busy_slot_steps",
                "decode_retries",
                "embed_memo_hits",
                "images",  # image chunks encoded and decoded into a slot
                "image_prefill_ms",  # their time: vision encoder plus embedding decode
            ),
            0.0,
        )
        self._thread = threading.Thread(target=self._run, name=f"sipp-engine-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ caller side
    def sampling_for(
        self, override: SamplingRuntimeConfig | None, temperature: float | None, top_p: float | None
    ) -> SamplingRuntimeConfig:
        """Endpoint defaults < `LocalTextOptions.sampling` < the typed request shortcuts."""
        merged = override.merged_over(self.sampling) if override is not None else self.sampling
        if temperature is not None:
            merged = replace(merged, temperature=temperature)
        if top_p is not None:
            merged = replace(merged, top_p=top_p)
        return merged

    def check_prompt(self, tokens: list[int]) -> None:
        if not tokens:
            raise InvalidRequestError("the prompt is empty after tokenization")
        if len(tokens) >= self.n_ctx_slot:
            raise ContextOverflowError(
                f"prompt is {len(tokens)} tokens but the context holds {self.n_ctx_slot} per slot "
                + (
                    "(the model's position table ends there: shorten the prompt)"
                    if self.n_ctx_slot == self.model.n_positions
                    else "(raise ContextRuntimeConfig.n_ctx or shorten the prompt)"
                )
            )
        if self.encoder and len(tokens) > self.ctx.n_ubatch:
            raise ContextOverflowError(
                f"prompt is {len(tokens)} tokens but this encoder reads at most "
                f"{self.ctx.n_ubatch} at once (raise ContextRuntimeConfig.n_ubatch and n_batch)"
            )

    @property
    def failure(self) -> str | None:
        """Why the worker died, once it has; None while it runs (or after a clean close)."""
        return self._failure

    def check_available(self) -> None:
        """Raise the error a new request gets once the worker has died."""
        failure = self._failure
        if failure is not None:
            raise UnavailableError(f"the local engine stopped after an internal error ({failure})")

    def submit(self, job: TextJob | EmbedJob) -> None:
        with self._cond:
            self.check_available()
            if self._closing:
                raise ClientClosedError("the endpoint is closed")
            free = max(0, self.max_running - len(self._active))
            if len(self._queue) >= self.max_queued + free:
                self._counters["rejected"] += 1
                raise OverloadedError(
                    f"endpoint queue is full ({self.max_queued} waiting); retry later"
                )
            self._counters["requests"] += 1
            self._queue.append(job)
            self._cond.notify_all()

    def answer_from_memo(self, job: EmbedJob) -> bool:
        """Finish `job` from the memo of its `context_key`, if that input ran before."""
        if job.context_key is None:
            return False
        response = self.embed_memo.get(job.context_key, job.tokens, job.normalize)
        if response is None:
            return False
        with self._cond:
            self.check_available()
            for name in ("requests", "completed", "embed_memo_hits"):
                self._counters[name] += 1
            self._counters["prompt_tokens"] += len(job.tokens)
            self._counters["cached_prompt_tokens"] += len(job.tokens)
        job.channel.finish(response)
        return True

    def runtime_metrics(self) -> dict[str, Any]:
        with self._cond:
            snap: dict[str, Any] = dict(self._counters)
            snap["queue_depth"] = len(self._queue)
            snap["running"] = len(self._active)
            snap["slots"] = len(self._slots)
            snap["busy_slots"] = sum(s.busy for s in self._slots)
        snap["busy_slots_per_step"] = (
            snap["busy_slot_steps"] / snap["steps"] if snap["steps"] else 0.0
        )
        if self.snapshots is not None:
            snap["snapshots"] = len(self.snapshots)
            snap["snapshot_bytes"] = self.snapshots.bytes
            snap["snapshots_saved"] = self.snapshots.saved
            snap["snapshots_restored"] = self.snapshots.restored
        if self.profiling and self.ctx.ptr:
            snap["backend_profile"] = self.ctx.perf()
        return snap

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
            self._free()

    def _free(self) -> None:
        self._batch.close()
        self.loaded.close()

    # ------------------------------------------------------------ worker side
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._queue and not self._active:
                        self._cond.wait()
                    if not self._closing and not self._active:
                        self._await_burst()
                    if self._closing:
                        break
                    embed_jobs, starts = self._admit()
                # KV edits and snapshot copies run outside the lock `submit` takes.
                for job in starts:
                    self._start(job)
                if starts and self.encoder:
                    self._encode_active(starts)
                if embed_jobs:
                    self._embedding = embed_jobs
                    self._embed_step(embed_jobs)
                    self._embedding = []
                if self._active:
                    self._text_step()
                    alone = self._alone()
                    if alone is not None:
                        self._generate_alone(alone)
        except BaseException as exc:  # never let a bug kill callers silently
            logger.exception("engine worker crashed")
            self._crashed(exc)
            return  # the model stays allocated until close(): a caller may still be tokenizing
        self._fail_all(ClientClosedError("the endpoint was closed"))
        self._free()

    def _crashed(self, exc: BaseException) -> None:
        """Record the failure and end every run: queued ones never started (retryable,
        `unavailable`); running ones were cut (`execution`). The llama state is suspect,
        so this touches no KV and frees nothing."""
        with self._cond:
            self._failure = f"{type(exc).__name__}: {exc}"
            self._closing = True
            queued, self._queue = list(self._queue), deque()
            active, self._active = list(self._active), []
            embedding, self._embedding = self._embedding, []
            for slot in self._slots:
                slot.busy = False
            self._counters["failed"] += len(active)
            self._cond.notify_all()
        for job in queued:
            if isinstance(job, TextJob):
                job.close()
            job.channel.finish(
                UnavailableError(
                    f"the local engine stopped before this request ran ({self._failure})"
                )
            )
        for job in active:
            job.close()
            job.channel.finish(ExecutionError(f"local engine failed: {self._failure}"))
        for embed in embedding:  # first outcome wins: finished ones keep their vectors
            embed.channel.finish(ExecutionError(f"local engine failed: {self._failure}"))

    def _fail_all(self, error: SippError) -> None:
        with self._cond:
            self._closing = True
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            if isinstance(job, TextJob):
                job.close()
            job.channel.finish(error)
        for job in list(self._active):
            self._release(job)
            job.channel.finish(error)

    def _await_burst(self) -> None:
        """With no request running, wait for the rest of a burst before the first step
        (caller holds the lock). Chats sent together reach the queue a few hundred microseconds apart
        (a client's loop of `chat` calls: 0.3-0.5 ms each); started at once, the first
        decode would prefill the first prompt alone and the others after it, two
        decodes and a micro-batch split where one decode does. The wait ends when no
        job comes for `burst_gap_s`, after `burst_max_s`, or when the queue holds as
        many jobs as can run; embeddings and a single-slot engine never wait."""
        if not any(isinstance(job, TextJob) for job in self._queue):
            return
        deadline = time.monotonic() + self.burst_max_s
        while not self._closing and len(self._queue) < self.max_running:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            queued = len(self._queue)
            self._cond.wait(min(self.burst_gap_s, left))
            if len(self._queue) == queued:
                return

    def _admit(self) -> tuple[list[EmbedJob], list[TextJob]]:
        """Take queued jobs this step can run and reserve a free slot for each text job
        (caller holds the lock). The caller then `_start`s those outside the lock."""
        embeds: list[EmbedJob] = []
        starts: list[TextJob] = []
        budget = self._batch.capacity
        keep: deque[TextJob | EmbedJob] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.channel.cancelled.is_set():
                self._finish_unstarted(job)
                continue
            if isinstance(job, EmbedJob):
                if len(embeds) < len(self._slots) and len(job.tokens) <= budget:
                    embeds.append(job)
                    budget -= len(job.tokens)
                else:
                    keep.append(job)
                continue
            if len(self._active) >= self.max_running:
                keep.append(job)
                continue
            if job.encoder_prompt is not None and not self._encoder_room(job):
                keep.append(job)
                continue
            slot = self._pick_slot(job)
            if slot is None:
                keep.append(job)
                continue
            slot.busy = True
            job.slot = slot
            self._active.append(job)
            starts.append(job)
        self._queue = keep
        return embeds, starts

    def _encoder_room(self, job: TextJob) -> bool:
        """Whether `job`'s encoder input fits in one encode beside every running job's:
        each admission encodes them all again (see `_encode_active`)."""
        assert job.encoder_prompt is not None
        running = sum(len(j.encoder_prompt or ()) for j in self._active)
        return running + len(job.encoder_prompt) <= self.ctx.n_ubatch

    def _encode_active(self, starts: list[TextJob]) -> None:
        """Encode the prompts of every running job (the new ones included) in one call.

        llama.cpp keeps a single encoder output per context and each `llama_encode`
        replaces it, while the decoder's cross-attention picks its rows by sequence id.
        So requests batch together only if their prompts are encoded together: a new
        request encodes every running one again. The encoder sees each sequence alone
        (llama.cpp masks across sequences) and T5's position bias depends only on
        distances, so each sequence starts where its decoder KV ends, as llama.cpp
        requires of a batch. If the encode fails, the new jobs fail and the others are
        encoded again without them."""
        running = [j for j in self._active if j not in starts]
        if self._encode(self._active):
            return
        for job in starts:
            self._fail_encode(job)
        if running and not self._encode(running):
            for job in running:
                self._fail_encode(job)

    def _encode(self, jobs: list[TextJob]) -> bool:
        batch = self._batch
        batch.clear()
        for job in jobs:
            assert job.slot is not None and job.encoder_prompt is not None
            base = len(job.slot.tokens)
            for i, token in enumerate(job.encoder_prompt):
                batch.add(token, base + i, job.slot.seq_id, True)
        status = self.ctx.encode(batch)
        if status != 0:
            logger.warning("llama_encode failed with status %d", status)
        return status == 0

    def _fail_encode(self, job: TextJob) -> None:
        assert job.slot is not None
        self.ctx.seq_rm(job.slot.seq_id, -1, -1)
        job.slot.tokens.clear()
        self._release(job)
        self._count_outcome(job, "failed")
        job.channel.finish(ExecutionError("llama_encode failed"))

    def _finish_unstarted(self, job: TextJob | EmbedJob) -> None:
        self._counters["cancelled"] += 1
        if isinstance(job, TextJob):
            job.close()
            job.channel.finish(self._response(job, "cancelled"))
        else:
            job.channel.finish(ExecutionError("embedding cancelled before it ran"))

    def _pick_slot(self, job: TextJob) -> _Slot | None:
        free = [s for s in self._slots if not s.busy]
        if not free:
            return None
        if not self.reuse_prefix:
            return free[0]
        if job.context_key is not None:
            for slot in free:
                if slot.context_key == job.context_key:
                    return slot
        # Longest reusable prefix; among equals, the least recently used slot.
        return max(free, key=lambda s: (common_prefix(s.tokens, job.prompt), -s.last_used))

    def _start(self, job: TextJob) -> None:
        slot = job.slot
        assert slot is not None
        keep = common_prefix(slot.tokens, job.prompt) if self.reuse_prefix else 0
        if self.snapshots is not None:
            keep = self._swap_snapshots(job, slot, keep)
        keep = min(keep, len(job.prompt) - 1)  # decode >= 1 token to get fresh logits
        keep = job.whole_images(keep)
        if not self.ctx.seq_rm(slot.seq_id, keep, -1):
            self.ctx.seq_rm(slot.seq_id, -1, -1)  # partial removal unsupported (e.g. SWA)
            keep = 0
        del slot.tokens[keep:]
        slot.context_key = job.context_key
        job.prefilled = job.cached = keep
        job.t_admit = time.perf_counter()
        settings = job.sampler.settings
        batched = settings.temperature <= 0.0 or self.sampled_rows_batched
        job.fast = row_sampler(settings) if self.batch_sampling and batched else None
        if self._can_share:
            self._share_sibling_prompt(job)

    def _share_sibling_prompt(self, job: TextJob) -> None:
        """n identical prompts arrive together (OpenAI's `n`, or a fan-out): let one of
        them prefill, the others copy its KV. Pick the running job whose prompt shares
        the longest prefix with ours, if that beats what our own slot kept.

        Only jobs already started count: jobs admitted together are all active before the
        first starts, and a job that picked a later one would wait on a chain (each copy
        freed one step after the last) instead of on the one that prefills."""
        best: TextJob | None = None
        # At least the last prompt token is decoded by the job itself, for its logits.
        most = job.prefilled
        for other in self._active:
            if other is job or other.share is not None or not other.t_admit:
                continue
            n = job.whole_images(min(common_prefix(other.prompt, job.prompt), len(job.prompt) - 1))
            if n > most:
                best, most = other, n
        if best is None:
            return
        gained = most - job.prefilled
        # An image in the shared part is always worth it: each copy would encode it again.
        image = job.media is not None and job.media.text_run(job.prefilled, most) < gained
        if gained < MIN_SHARED_TOKENS and not image:
            return
        job.share = (best, most)
        if best.prefilled >= most:
            self._copy_shared(job)
        else:
            self._waiters.append(job)

    def _copy_shared(self, job: TextJob) -> None:
        """Copy the sibling's first n KV cells into our slot. Through host memory, as a
        snapshot restore does: llama_memory_seq_cp across the per-slot streams copies the
        whole stream and only at the next decode, too late if either slot changes first."""
        assert job.share is not None and job.slot is not None
        sibling, n = job.share
        job.share = None
        assert sibling.slot is not None
        state = self.ctx.seq_state(sibling.slot.seq_id)
        seq = job.slot.seq_id
        self.ctx.seq_rm(seq, -1, -1)
        if self.ctx.set_seq_state(seq, state):
            if not self.ctx.seq_rm(seq, n, -1):
                self._can_share = False  # this memory cannot cut a sequence: never again
            elif self.ctx.seq_span(seq) == (0, n - 1):
                job.slot.tokens = job.prompt[:n]
                job.prefilled = job.cached = n
                return
        # Not all of positions 0..n-1 came across (a sliding-window cache drops cells once
        # the sibling has moved past them): the job prefills its whole prompt itself.
        self.ctx.seq_rm(seq, -1, -1)
        job.slot.tokens = []
        job.prefilled = job.cached = 0

    def _copy_ready_shares(self) -> None:
        """After a decode: every waiter whose sibling now holds the shared prefix copies it."""
        for job in [w for w in self._waiters if w.share and w.share[0].prefilled >= w.share[1]]:
            self._waiters.remove(job)
            self._copy_shared(job)

    def _swap_snapshots(self, job: TextJob, slot: _Slot, keep: int) -> int:
        """Save what `slot` would lose; restore a stored sequence that shares more of the prompt."""
        assert self.snapshots is not None
        candidate = self.snapshots.best(job.prompt, job.context_key)
        # Taken out before the slot's own state goes in: that put may evict it (the
        # store is full) or supersede it (the same context_key).
        snap = None
        if candidate is not None and candidate[1] > keep:
            snap = self.snapshots.take(candidate[0])
        if len(slot.tokens) - keep >= MIN_SNAPSHOT_TOKENS or (snap is not None and slot.tokens):
            self.snapshots.put(
                Snapshot(tuple(slot.tokens), self.ctx.seq_state(slot.seq_id), slot.context_key)
            )
        if snap is None or candidate is None:
            return keep
        self.ctx.seq_rm(slot.seq_id, -1, -1)
        if self.ctx.set_seq_state(slot.seq_id, snap.state):
            slot.tokens = list(snap.tokens)
            return candidate[1]
        slot.tokens = []
        return 0

    def _text_step(self) -> None:
        for job in [j for j in self._active if j.channel.cancelled.is_set()]:
            self._finish(job, "cancelled")
        if not self._active:
            return
        # One entry per job: (job, 0) decodes its last sampled token; (job, n) prefills
        # the next n prompt tokens. Generating jobs first, then prompt chunks in the room left.
        plan: list[tuple[TextJob, int]] = [(j, 0) for j in self._take_turns()]
        room = self._batch.capacity - len(plan)
        images: list[TextJob] = []  # jobs whose prefill has reached an image
        for job in self._active:
            if room <= 0:
                break
            if not job.prefilling or job.share is not None:
                continue
            take = len(job.prompt) - job.prefilled
            if job.media is not None:
                if job.media.image_at(job.prefilled) is not None:
                    images.append(job)
                    continue
                take = job.media.text_run(job.prefilled, len(job.prompt))
            if self.chunk_cap:
                take = min(take, self.chunk_cap)
            take = min(take, room)
            plan.append((job, take))
            room -= take
        with self._cond:
            self._counters["steps"] += 1
            self._counters["busy_slot_steps"] += len(self._active)
        for job in images:
            self._prefill_image(job)
        if images and self._waiters:
            self._copy_ready_shares()
        if plan:
            self._decode_plan(plan)

    def _prefill_image(self, job: TextJob) -> None:
        """Run the image chunk at `job`'s prefill point: the projector encodes it, its
        embeddings go into the slot's KV at the next positions (their own decode calls:
        a llama batch holds either tokens or embeddings)."""
        assert job.slot is not None and job.media is not None
        projector = self.loaded.projector
        chunk = job.media.image_at(job.prefilled)
        assert projector is not None and chunk is not None
        slot = job.slot
        start = time.perf_counter()
        status = projector.eval_image(
            self.ctx, chunk, len(slot.tokens), slot.seq_id, self._batch.capacity
        )
        with self._cond:
            self._counters["images"] += 1
            self._counters["image_prefill_ms"] += (time.perf_counter() - start) * 1000
        if status != 0:
            self._fail(job, status, "the image")
            return
        end = job.prefilled + chunk.n_tokens
        slot.tokens.extend(job.prompt[job.prefilled : end])
        job.prefilled = end

    def _alone(self) -> TextJob | None:
        """The one job running, if it generates and nothing else waits for the engine.

        `_queue` and `_closing` are read without the lock: a submit that lands just
        after the check waits for one token, no more (see `_generate_alone`)."""
        if not self.lone_loop or len(self._active) != 1:
            return None
        if self._queue or self._waiters or self._closing:
            return None
        job = self._active[0]
        return None if job.prefilling else job

    def _generate_alone(self, job: TextJob) -> None:
        """Decode and sample `job`'s tokens one at a time for as long as it runs alone.

        The same work as `_text_step` for a plan of one generating job, without the
        plan, the ready lists and the lock per step: on a model that decodes a token in
        a quarter of a millisecond (T5-small class), that bookkeeping is a few percent
        of its speed. It returns as soon as another request is queued, the job is
        cancelled or ends, or the engine closes; the step loop takes over from there."""
        slot = job.slot
        assert slot is not None
        ctx, tokens, seq = self.ctx, slot.tokens, slot.seq_id
        cancelled = job.channel.cancelled
        # One row: the choice `_sample` makes for it, taken once; a greedy row off its
        # chain is one argmax over its logits, without the batch sampler's bookkeeping.
        fast = job.fast
        chain = fast is None or (fast.greedy and self._small_vocab)
        sample = job.sampler.sample
        counters = self._counters
        job.out_index = 0  # decode_token's batch holds the one token
        while not (self._queue or self._closing or cancelled.is_set()):
            # Counted as `_text_step` counts, before the decode; without its lock, as
            # only this thread writes them and a reader copies them under the lock.
            counters["steps"] += 1
            counters["busy_slot_steps"] += 1
            status = ctx.decode_token(job.last_token, len(tokens), seq)
            if status != 0:
                self._fail(job, status)
                break
            tokens.append(job.last_token)
            if chain:
                token = sample(ctx, 0)
            elif fast is not None and fast.greedy:
                row = ctx.logits_row(0)
                token = greedy_token(row, int(row.argmax()), fast)
            else:
                token = self._sample([job])[0]
            self._on_token(job, token)
            if not self._active:  # it finished
                break

    def _take_turns(self) -> list[TextJob]:
        """The generating jobs that decode this step: all of them when they fit in
        `n_batch`, else `n_batch` of them in rotation, so every sequence advances.

        When they fill the batch, prompts waiting to prefill get a share of it too (in
        proportion to their number, at least one token; with a one-token batch, every
        other step): else a new request waits until enough generations have ended."""
        generating = [j for j in self._active if not j.prefilling]
        cap = self._batch.capacity
        if len(generating) >= cap:
            waiting = sum(1 for j in self._active if j.prefilling and j.share is None)
            if waiting:
                share = max(1, cap * waiting // (len(generating) + waiting))
                self._prefill_turn = not self._prefill_turn
                if share < cap or self._prefill_turn:
                    cap -= share
        if len(generating) <= cap:
            return generating
        if cap == 0:
            return []
        start = self._turn % len(generating)
        self._turn = start + cap
        return (generating[start:] + generating[:start])[:cap]

    def _decode_plan(self, plan: list[tuple[TextJob, int]]) -> None:
        """Decode `plan` as one batch and sample what it produced. If llama_decode fails,
        roll every sequence back to its committed tokens and retry the halves, so only a
        job that fails on its own fails (not everyone who shared its batch)."""
        batch = self._batch
        batch.clear()
        for job, take in plan:
            slot = job.slot
            assert slot is not None
            if take == 0:
                job.out_index = batch.add(job.last_token, len(slot.tokens), slot.seq_id, True)
                continue
            last = job.prefilled + take
            for i in range(job.prefilled, last):
                idx = batch.add(job.prompt[i], i, slot.seq_id, i == len(job.prompt) - 1)
            job.out_index = idx if last == len(job.prompt) else -1
        status = self.ctx.decode(batch)
        if status != 0:
            self._decode_failed(plan, status)
            return
        now = time.perf_counter()
        for job, take in plan:
            assert job.slot is not None
            if take == 0:
                job.slot.tokens.append(job.last_token)
            else:
                job.slot.tokens.extend(job.prompt[job.prefilled : job.prefilled + take])
                job.prefilled += take
        if self._waiters:  # before sampling: a sibling that finishes now still holds its KV
            self._copy_ready_shares()
        ready = [job for job, take in plan if take == 0 or not job.prefilling]
        for job in ready:
            if job.t_first == 0.0:
                job.t_first = now
        for job, token in zip(ready, self._sample(ready)):
            self._on_token(job, token)

    def _sample(self, jobs: list[TextJob]) -> list[int]:
        """One token per job from the last decode: rows the batch sampler can take
        together in one pass over llama.cpp's logits, the rest through their chains."""
        fast = [(i, job.fast) for i, job in enumerate(jobs) if job.fast is not None]
        if len(fast) == 1 and fast[0][1].greedy and self._small_vocab:
            fast = []
        if not fast:
            return [job.sampler.sample(self.ctx, job.out_index) for job in jobs]
        tokens = [0] * len(jobs)
        logits, rows = self.ctx.logits_rows([jobs[i].out_index for i, _ in fast])
        picked = sample_rows(logits, rows, [sampler for _, sampler in fast])
        for (i, _), token in zip(fast, picked):
            tokens[i] = token
        taken = {i for i, _ in fast}
        for i, job in enumerate(jobs):
            if i not in taken:
                tokens[i] = job.sampler.sample(self.ctx, job.out_index)
        return tokens

    def _decode_failed(self, plan: list[tuple[TextJob, int]], status: int) -> None:
        # Some ubatches may have reached the KV memory (status 2 and < -1): drop every
        # position past what each sequence has committed.
        retry: list[tuple[TextJob, int]] = []
        for job, take in plan:
            assert job.slot is not None
            if self.ctx.seq_rm(job.slot.seq_id, len(job.slot.tokens), -1):
                retry.append((job, take))
            else:  # this memory cannot cut a sequence (e.g. SWA): the job cannot go on
                self._fail(job, status)
        if len(retry) > 1:
            with self._cond:
                self._counters["decode_retries"] += 1
            half = len(retry) // 2
            self._decode_plan(retry[:half])
            self._decode_plan(retry[half:])
        elif retry:
            self._fail(retry[0][0], status)

    def _fail(self, job: TextJob, status: int, what: str = "llama_decode") -> None:
        assert job.slot is not None
        logger.warning("%s failed with status %d; failing one request", what, status)
        self.ctx.seq_rm(job.slot.seq_id, -1, -1)
        job.slot.tokens.clear()
        self._release(job)
        self._count_outcome(job, "failed")
        if what == "llama_decode":
            job.channel.finish(ExecutionError(f"llama_decode failed with status {status}"))
        else:
            job.channel.finish(ExecutionError(f"{what} failed to encode or decode ({status})"))

    def _on_token(self, job: TextJob, token: int) -> None:
        assert job.slot is not None
        if token == _llama.NO_TOKEN:
            self._release(job)
            self._count_outcome(job, "failed")
            job.channel.finish(
                InvalidRequestError(
                    f"the grammar admits no token after {job.generated} generated "
                    "(it matches nothing, or logit_bias bans every token it allows)"
                )
            )
            return
        if self.model.is_eog(token):
            self._finish(job, "stop")
            return
        job.generated += 1
        job.last_token = token
        job.held_ids.append(token)
        if job.top_logprobs is not None:
            row = self.ctx.logits_row(job.out_index)
            job.held_logprobs.append(token_logprob(self.model, row, token, job.top_logprobs))
        text = job.stream.feed(self.model.piece(token))
        if text:
            self._on_text(job, text, final=False)
        if job.stream.stopped:
            self._finish(job, "stop")
        elif job.max_new is not None and job.generated >= job.max_new:
            self._finish(job, "length")
        elif len(job.slot.tokens) + 1 >= self.n_ctx_slot:
            self._finish(job, "length")  # no room left to decode the next token

    def _on_text(self, job: TextJob, text: str, *, final: bool) -> None:
        """Pass released text through the tool-call parser, if the job has one: what it
        holds back (a possible call marker, a call being written) keeps its tokens held."""
        calls: list[ToolCallDelta] = []
        if job.tools is not None:
            text, calls = job.tools.feed(text)
            if final:
                tail, more = job.tools.finish()
                text, calls = text + tail, calls + more
        if text or calls:
            self._release_text(job, text, tuple(calls))

    def _release_text(self, job: TextJob, text: str, calls: tuple[ToolCallDelta, ...] = ()) -> None:
        """Hand out `text` (and completed tool calls) with the tokens it completes. Tokens
        whose text never gets released (cut by a stop string, or half a character at the
        end) are not reported."""
        if not job.emit and not job.held_logprobs:  # nobody sees the ids
            job.held_ids.clear()
            return
        ids, job.held_ids = tuple(job.held_ids), []
        logprobs: tuple[TokenLogprob, ...] = ()
        if job.held_logprobs:
            logprobs, job.held_logprobs = tuple(job.held_logprobs), []
            job.logprobs.extend(logprobs)
        if job.emit:
            batch = TokenBatch(text, ids, next(job.batch_seq), logprobs, calls)
            job.channel.push(batch, hold_s=STREAM_HOLD_S)

    def _finish(self, job: TextJob, reason: FinishReason) -> None:
        tail = job.stream.flush()
        if tail or job.tools is not None:
            self._on_text(job, tail, final=True)
        response = self._response(job, reason)
        self._release(job)
        self._count_outcome(job, "cancelled" if reason == "cancelled" else "completed")
        job.channel.finish(response)

    def _response(self, job: TextJob, reason: FinishReason) -> SippTextResponse:
        end = time.perf_counter()
        prefill_ms = ((job.t_first or end) - (job.t_admit or end)) * 1000
        decode_s = end - job.t_first if job.t_first else 0.0
        stats = LocalStats(
            prompt_tokens=job.prompt_tokens,
            cached_prompt_tokens=job.cached,
            generated_tokens=job.generated,
            prefill_ms=prefill_ms,
            decode_ms=decode_s * 1000,
            tokens_per_second=(job.generated - 1) / decode_s
            if job.generated > 1 and decode_s > 0
            else 0.0,
            queue_ms=((job.t_admit or end) - job.t_submit) * 1000,
        )
        usage = Usage(job.prompt_tokens, job.generated, job.prompt_tokens + job.generated)
        logprobs = tuple(job.logprobs) if job.top_logprobs is not None else None
        matched = job.stream.matched
        if job.tools is None:
            return SippTextResponse(job.stream.text, reason, usage, stats, logprobs, (), matched)
        calls = tuple(job.tools.calls)
        if calls and reason == "stop":
            reason = "tool_calls"
        return SippTextResponse(job.tools.text, reason, usage, stats, logprobs, calls, matched)

    def _release(self, job: TextJob) -> None:
        job.close()
        if job in self._active:
            self._active.remove(job)
        if self._waiters:
            self._drop_shares_with(job)
        slot = job.slot
        if slot is not None:
            slot.busy = False
            slot.last_used = time.perf_counter()
            if not self.reuse_prefix:
                self.ctx.seq_rm(slot.seq_id, -1, -1)
                slot.tokens.clear()
        with self._cond:
            self._cond.notify_all()

    def _drop_shares_with(self, job: TextJob) -> None:
        """`job` leaves: it no longer waits to copy, and whoever waited on it prefills alone."""
        if job in self._waiters:
            self._waiters.remove(job)
            job.share = None
        for waiter in [w for w in self._waiters if w.share and w.share[0] is job]:
            self._waiters.remove(waiter)
            waiter.share = None

    def _count_outcome(self, job: TextJob, outcome: str) -> None:
        with self._cond:
            c = self._counters
            c[outcome] += 1
            c["prompt_tokens"] += job.prompt_tokens
            c["cached_prompt_tokens"] += job.cached
            c["generated_tokens"] += job.generated
            end = time.perf_counter()
            if job.t_first:
                c["prefill_ms"] += (job.t_first - job.t_admit) * 1000
                c["decode_ms"] += (end - job.t_first) * 1000

    # ------------------------------------------------------------ embeddings
    def _embed_step(self, jobs: list[EmbedJob]) -> None:
        batch = self._batch
        batch.clear()
        spans: list[tuple[EmbedJob, int, int]] = []
        for seq, job in enumerate(jobs):
            self.ctx.seq_rm(seq, -1, -1)
            first = batch.n
            for pos, token in enumerate(job.tokens):
                batch.add(token, pos, seq, True)
            spans.append((job, seq, first))
        with self._cond:
            self._counters["steps"] += 1
        status = self.ctx.decode(batch)
        if status != 0 and len(jobs) > 1:
            # Retry each input alone, so only one that fails by itself fails.
            for _, seq, _ in spans:
                self.ctx.seq_rm(seq, -1, -1)
            with self._cond:
                self._counters["decode_retries"] += 1
            for job in jobs:
                self._embed_step([job])
            return
        n_embd = self.model.n_embd
        pooling = self.ctx.pooling
        for job, seq, first in spans:
            outcome: SippEmbeddingResponse | SippError
            try:
                if status != 0:
                    raise ExecutionError(f"llama_decode failed with status {status}")
                if pooling == "none":
                    rows = [
                        self.ctx.embedding_ith(first + i, n_embd) for i in range(len(job.tokens))
                    ]
                else:
                    rows = [self.ctx.embedding_seq(seq, n_embd)]
                if job.normalize:
                    rows = [_l2_normalize(r) for r in rows]
                values = [v for row in rows for v in row]
                usage = Usage(len(job.tokens), 0, len(job.tokens))
                outcome = SippEmbeddingResponse(
                    values, pooling, job.normalize, n_embd, usage, len(rows)
                )
                if job.context_key is not None:
                    self.embed_memo.put(job.context_key, job.tokens, job.normalize, outcome)
            except SippError as exc:
                outcome = exc
            except RuntimeError as exc:
                outcome = ExecutionError(str(exc))
            finally:
                self.ctx.seq_rm(seq, -1, -1)
            # Counted before the caller can see the result: metrics read after it include it.
            with self._cond:
                self._counters["failed" if isinstance(outcome, SippError) else "completed"] += 1
                self._counters["prompt_tokens"] += len(job.tokens)
            job.channel.finish(outcome)


def _l2_normalize(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row] if norm > 0 else row
