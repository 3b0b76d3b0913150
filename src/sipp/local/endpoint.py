"""`LocalEndpoint`: turns client requests into engine jobs for one loaded GGUF.

Preparing a request (chat template, tokenizer, grammar compile) is CPU work that
grows with the prompt. The sync client does it in the caller's thread, so errors
raise from the call; the async client (and so the gateway) hands it to one
preparation thread per endpoint, so a 1 MiB prompt never stalls the event loop,
and a preparation error fails the run with the same typed error instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from typing import Any, TypeVar

from .._channel import RunChannel
from .._descriptors import EndpointKind, LocalModelDescriptor
from .._endpoint import EmbedRequest, Endpoint, Operation, TextRequest
from .._errors import (
    ClientClosedError,
    ContextOverflowError,
    ExecutionError,
    InvalidRequestError,
    SippError,
    UnsupportedOperationError,
)
from .._runtime_config import SamplingRuntimeConfig
from .._types import ChatMessage, SippEmbeddingResponse, SippTextResponse, not_unicode
from . import _llama
from .chat_template import HERMES_OPEN
from .images import load_image
from .model import load_model
from .scheduler import EmbedJob, Engine, TextJob
from .text_stream import TextStream
from .tool_plan import ToolPlan, plan_tools
from .vision import MediaPrompt, gather_images, media_prompt

__all__ = ["LocalEndpoint"]

logger = logging.getLogger("sipp.local")
R = TypeVar("R")


class LocalEndpoint(Endpoint):
    kind: EndpointKind = "local"

    def __init__(
        self, descriptor: LocalModelDescriptor, name: str, backend: str | None = None
    ) -> None:
        self.descriptor = descriptor
        loaded = load_model(descriptor.path, descriptor.config, backend)
        self.loaded = loaded
        self.backend = loaded.backend
        self._engine = Engine(loaded, descriptor.config, name)
        self._closed = threading.Event()
        # Callers tokenizing in their own thread (the sync path, the gateway's token
        # count): close() waits for them before the model is freed under them.
        self._model_users = 0
        self._model_free = threading.Condition()
        # One thread keeps preparation in arrival order (the engine queue is FIFO).
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sipp-prep-{name}")

    # -- capabilities -------------------------------------------------------------
    def supports(self, operation: Operation) -> bool:
        if operation == "embed":
            return self.loaded.embeddings
        return not self.loaded.embeddings and self.loaded.model.generates

    def _require(self, operation: Operation) -> None:
        if self.supports(operation):
            return
        name = self.loaded.path.name
        if operation == "embed" and self.loaded.model.encoder_decoder:
            raise UnsupportedOperationError(
                f"{name} is an encoder-decoder model: it generates text with query, "
                "and this runtime computes no embeddings with it"
            )
        if operation == "embed":
            raise UnsupportedOperationError(
                f"{name} was not loaded for embeddings; register it with "
                "NativeRuntimeConfig(context=ContextRuntimeConfig(embeddings=True, pooling=...))"
            )
        if not self.loaded.model.generates:
            raise UnsupportedOperationError(
                f"{name} is an embedding model (its attention is not causal): it generates "
                "no text; load it with ContextRuntimeConfig(embeddings=True) and use embed"
            )
        raise UnsupportedOperationError(
            f"{name} is loaded for embeddings only; {operation} needs a text-generation load"
        )

    def supports_tools(self) -> bool:
        return True

    @cached_property
    def _tool_marker_token(self) -> int | None:
        """The id of `<tool_call>` when the vocabulary has it as one token (Qwen does):
        a lazy grammar can then start exactly there."""
        tokens = self.loaded.model.tokenize(HERMES_OPEN, add_special=False, parse_special=True)
        return tokens[0] if len(tokens) == 1 else None

    # -- text -------------------------------------------------------------------------
    def render_chat(
        self, request: TextRequest, messages: list[ChatMessage] | None = None
    ) -> tuple[str, ToolPlan | None]:
        """The prompt, and how tool calls run when the request has tools or tool turns.
        `messages` replaces the request's (vision chat: with media markers written in)."""
        template = self.loaded.chat_template
        if template is None:
            why = self.loaded.template_problem or "its GGUF declares no tokenizer.chat_template"
            raise UnsupportedOperationError(
                f"chat is unavailable for {self.loaded.path.name}: {why}; "
                "use query with a prompt you render yourself"
            )
        if messages is None:
            assert request.messages is not None
            messages = list(request.messages)
        if not request.options.tools and not any(m.tool_calls or m.tool_call_id for m in messages):
            return template.render(messages, add_generation_prompt=True), None
        plan = plan_tools(template.tool_support, messages, request.options, self._tool_marker_token)
        text = template.render(plan.messages, tools=plan.template_tools, add_generation_prompt=True)
        return text, plan

    @contextmanager
    def model_in_use(self) -> Iterator[None]:
        """Hold the model for work outside the engine (tokenizing, rendering, building a
        sampler): close() waits for it to end. Text that is not valid Unicode (a lone
        surrogate, which JSON's escapes can carry) is the request's fault, not ours."""
        with self._model_free:
            if self._closed.is_set():
                raise ClientClosedError("the endpoint was closed")
            self._model_users += 1
        try:
            yield
        except UnicodeEncodeError as exc:
            raise not_unicode(exc, "text") from None
        finally:
            with self._model_free:
                self._model_users -= 1
                if not self._model_users:
                    self._model_free.notify_all()

    def start_text(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self._check_text(request)
        with self.model_in_use():
            self._submit_text(request, channel)

    def start_text_async(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self._check_text(request)
        self._later(lambda: self._submit_text(request, channel), channel)

    def _check_text(self, request: TextRequest) -> None:
        """The checks that cost nothing: they raise from the call on either path."""
        self._engine.check_available()
        self._require(request.operation)
        _reject_remote_options(request.endpoint_options, request.provider_options)
        has_images = bool(request.local is not None and request.local.media) or any(
            m.images for m in request.messages or ()
        )
        if has_images and request.operation == "query":
            raise UnsupportedOperationError(
                "images need chat: the chat template places them (query takes text only)"
            )
        if has_images and self.loaded.projector is None:
            raise UnsupportedOperationError(
                f"{self.loaded.path.name} was loaded without a vision projector; load it with "
                "NativeRuntimeConfig(multimodal=MultimodalRuntimeConfig(projector_path=...)) "
                "to send images"
            )
        if request.operation == "query" and request.options.tools:
            raise UnsupportedOperationError(
                "tools need chat on a local endpoint: the model's chat template renders them"
            )

    def _later(self, submit: Callable[[], None], channel: RunChannel[R]) -> None:
        channel.begin_preparing()
        try:
            self._prep.submit(self._prepare, submit, channel)
        except RuntimeError:  # the executor was shut down: close() has begun
            raise ClientClosedError("the endpoint was closed") from None

    def _prepare(self, submit: Callable[[], None], channel: RunChannel[R]) -> None:
        """Run `submit` on the preparation thread; its failure is the run's outcome."""
        try:
            with self.model_in_use():
                submit()
        except SippError as exc:
            channel.finish(exc)
        except Exception:
            logger.exception("preparing a local request failed")
            channel.finish(ExecutionError("internal error while preparing the request"))
        finally:
            channel.end_preparing()

    def _submit_text(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        model = self.loaded.model
        plan: ToolPlan | None = None
        local = request.local
        media: MediaPrompt | None = None
        images: list[Any] = []
        if request.operation == "chat":
            messages = None
            projector = self.loaded.projector
            if projector is not None:
                assert request.messages is not None
                messages, images = gather_images(
                    request.messages, local.media if local is not None else None, projector.marker
                )
            text, plan = self.render_chat(request, messages)
            assert self.loaded.chat_template is not None  # render_chat raised otherwise
            bos = self.loaded.chat_template.bos_token
            # The template already wrote BOS when the model wants one: don't add it twice.
            add_special = not (bos and text.startswith(bos))
        else:
            assert request.prompt is not None
            text, add_special = request.prompt, True
        if images:
            tokens, media = self._tokenize_with_images(text, images, add_special)
        else:
            tokens = model.tokenize(text, add_special=add_special, parse_special=True)
        try:
            self._submit_tokens(request, channel, tokens, plan, media)
        except BaseException:
            if media is not None:
                media.close()
            raise

    def _tokenize_with_images(
        self, text: str, images: list[Any], add_special: bool
    ) -> tuple[list[int], MediaPrompt]:
        projector = self.loaded.projector
        assert projector is not None
        decoded = [load_image(item) for item in images]
        try:
            chunks = projector.tokenize(text, decoded, add_special=add_special)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), field="images") from None
        try:
            return media_prompt(chunks)
        except BaseException:
            chunks.close()
            raise

    def _submit_tokens(
        self,
        request: TextRequest,
        channel: RunChannel[SippTextResponse],
        tokens: list[int],
        plan: ToolPlan | None,
        media: MediaPrompt | None,
    ) -> None:
        model = self.loaded.model
        options, local = request.options, request.local
        self._engine.check_prompt(tokens)
        encoder_prompt: list[int] | None = None
        if model.encoder_decoder:  # the encoder reads the prompt; the decoder starts afresh
            encoder_prompt, tokens = tokens, [model.decoder_start]
        override = local.sampling if local is not None else None
        if override is not None and not isinstance(override, SamplingRuntimeConfig):
            raise InvalidRequestError("LocalTextOptions.sampling must be a SamplingRuntimeConfig")
        sampling = self._engine.sampling_for(override, options.temperature, options.top_p)
        outside = [t for t in sampling.logit_bias or () if not 0 <= t < model.n_vocab]
        if outside:  # llama.cpp would skip them without a word
            raise InvalidRequestError(
                f"logit_bias token id {outside[0]} is outside this model's vocabulary "
                f"(0 to {model.n_vocab - 1})",
                field="logit_bias",
            )
        grammar = None
        if plan is not None and plan.grammar is not None:
            if local is not None and (local.grammar is not None or local.json_schema is not None):
                raise InvalidRequestError(
                    "LocalTextOptions.grammar and json_schema cannot be combined with tools "
                    "(tool calls bring their own grammar); use tool_choice='none' to keep yours"
                )
            grammar = plan.grammar
        elif local is not None and local.grammar is not None:
            grammar = local.grammar
        elif local is not None and local.json_schema is not None:
            try:
                grammar = _llama.json_schema_to_grammar(local.json_schema)
            except Exception as exc:  # the converter raises plain exceptions
                raise InvalidRequestError(
                    f"json_schema cannot be turned into a grammar: {exc}"
                ) from exc
        try:
            sampler = _llama.Sampler(
                model,
                _llama.SamplerSettings(
                    temperature=float(sampling.temperature or 0.0),
                    # A k past the vocabulary keeps it all; past int32 it would wrap
                    # into llama.cpp's int and mean something else.
                    top_k=min(int(sampling.top_k or 0), 2**31 - 1),
                    top_p=float(sampling.top_p if sampling.top_p is not None else 1.0),
                    min_p=float(sampling.min_p or 0.0),
                    repeat_penalty=float(sampling.repeat_penalty or 1.0),
                    seed=_llama.DEFAULT_SEED if sampling.seed is None else int(sampling.seed),
                    order=tuple(sampling.samplers or ()),
                    logit_bias=dict(sampling.logit_bias or {}),
                    grammar=grammar,
                    grammar_trigger_tokens=(plan.trigger_token,)
                    if plan is not None and plan.trigger_token is not None
                    else (),
                    frequency_penalty=float(sampling.frequency_penalty or 0.0),
                    presence_penalty=float(sampling.presence_penalty or 0.0),
                    penalty_window=self._engine.n_ctx_slot,
                ),
                prompt=tokens,
            )
        except ValueError as exc:
            raise InvalidRequestError(f"invalid grammar: {exc}") from exc
        job = TextJob(
            channel=channel,
            prompt=tokens,
            sampler=sampler,
            max_new=options.max_tokens,
            stream=TextStream(options.stop or ()),
            emit=request.emit_tokens,
            context_key=local.context_key if local is not None else None,
            top_logprobs=(local.top_logprobs or 0)
            if local is not None and local.logprobs
            else None,
            tools=plan.parser() if plan is not None else None,
            encoder_prompt=encoder_prompt,
            media=media,
        )
        try:
            self._engine.submit(job)
        except BaseException:
            sampler.close()
            raise

    # -- embeddings -------------------------------------------------------------------
    def start_embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        self._check_embed(request)
        with self.model_in_use():
            self._submit_embed(request, channel)

    def start_embed_async(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        self._check_embed(request)
        self._later(lambda: self._submit_embed(request, channel), channel)

    def _check_embed(self, request: EmbedRequest) -> None:
        self._engine.check_available()
        self._require("embed")
        _reject_remote_options(request.endpoint_options, request.provider_options)

    def _submit_embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        tokens = self.loaded.model.tokenize(request.input, add_special=True, parse_special=False)
        if not tokens:
            raise InvalidRequestError("embedding input is empty after tokenization")
        limit = min(self._engine.n_ctx_slot, self.loaded.n_batch)
        if len(tokens) > limit:
            positions = self.loaded.model.n_positions
            raise ContextOverflowError(
                f"embedding input is {len(tokens)} tokens; this load embeds at most {limit} "
                + (
                    f"(the model's position table holds {positions})"
                    if limit == positions
                    else "(raise ContextRuntimeConfig.n_ctx / n_batch)"
                )
            )
        local = request.local
        normalize = bool(local.normalize) if local is not None else False
        job = EmbedJob(channel, tokens, normalize, local.context_key if local is not None else None)
        if not self._engine.answer_from_memo(job):
            self._engine.submit(job)

    # -- lifecycle --------------------------------------------------------------------
    def runtime_metrics(self) -> dict[str, Any]:
        return {**self._engine.runtime_metrics(), "backend": self.backend}

    def failure(self) -> str | None:
        return self._engine.failure

    def close(self) -> None:
        with self._model_free:
            self._closed.set()
            while self._model_users:
                self._model_free.wait()
        # Preparation tokenizes with the model: let it drain before the model is freed.
        self._prep.shutdown(wait=True)
        self._engine.close()


def _reject_remote_options(endpoint_options: Any, provider_options: Any) -> None:
    if endpoint_options:
        raise InvalidRequestError("endpoint_options are for gateway endpoints, not local ones")
    if provider_options:
        raise InvalidRequestError("provider_options are for provider endpoints, not local ones")
