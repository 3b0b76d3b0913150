"""`LocalEndpoint`: turns client requests into engine jobs for one loaded GGUF."""

from __future__ import annotations

from typing import Any

from .._channel import RunChannel
from .._descriptors import EndpointKind, LocalModelDescriptor
from .._endpoint import EmbedRequest, Endpoint, Operation, TextRequest
from .._errors import (
    ContextOverflowError,
    InvalidRequestError,
    UnsupportedOperationError,
)
from .._runtime_config import SamplingRuntimeConfig
from .._types import SippEmbeddingResponse, SippTextResponse
from . import _llama
from .model import load_model
from .scheduler import EmbedJob, Engine, TextJob
from .text_stream import TextStream

__all__ = ["LocalEndpoint"]


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

    # -- capabilities -------------------------------------------------------------
    def supports(self, operation: Operation) -> bool:
        if operation == "embed":
            return self.loaded.embeddings
        return not self.loaded.embeddings and self.loaded.model.has_decoder

    def _require(self, operation: Operation) -> None:
        if self.supports(operation):
            return
        name = self.loaded.path.name
        if operation == "embed":
            raise UnsupportedOperationError(
                f"{name} was not loaded for embeddings; register it with "
                "NativeRuntimeConfig(context=ContextRuntimeConfig(embeddings=True, pooling=...))"
            )
        raise UnsupportedOperationError(
            f"{name} is loaded for embeddings only; {operation} needs a text-generation load"
        )

    # -- text -------------------------------------------------------------------------
    def render_chat(self, request: TextRequest) -> str:
        template = self.loaded.chat_template
        if template is None:
            why = self.loaded.template_problem or "its GGUF declares no tokenizer.chat_template"
            raise UnsupportedOperationError(
                f"chat is unavailable for {self.loaded.path.name}: {why}; "
                "use query with a prompt you render yourself"
            )
        assert request.messages is not None
        return template.render(request.messages, add_generation_prompt=True)

    def start_text(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self._require(request.operation)
        _reject_remote_options(request.endpoint_options, request.provider_options)
        model = self.loaded.model
        if request.operation == "chat":
            text = self.render_chat(request)
            assert self.loaded.chat_template is not None  # render_chat raised otherwise
            bos = self.loaded.chat_template.bos_token
            # The template already wrote BOS when the model wants one: don't add it twice.
            add_special = not (bos and text.startswith(bos))
        else:
            assert request.prompt is not None
            text, add_special = request.prompt, True
        tokens = model.tokenize(text, add_special=add_special, parse_special=True)
        options, local = request.options, request.local
        self._engine.check_prompt(tokens)
        override = local.sampling if local is not None else None
        if override is not None and not isinstance(override, SamplingRuntimeConfig):
            raise InvalidRequestError("LocalTextOptions.sampling must be a SamplingRuntimeConfig")
        sampling = self._engine.sampling_for(override, options.temperature, options.top_p)
        grammar = None
        if local is not None and local.grammar is not None:
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
                    top_k=int(sampling.top_k or 0),
                    top_p=float(sampling.top_p if sampling.top_p is not None else 1.0),
                    min_p=float(sampling.min_p or 0.0),
                    repeat_penalty=float(sampling.repeat_penalty or 1.0),
                    seed=_llama.DEFAULT_SEED if sampling.seed is None else int(sampling.seed),
                    order=tuple(sampling.samplers or ()),
                    logit_bias=dict(sampling.logit_bias or {}),
                    grammar=grammar,
                ),
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
        self._require("embed")
        _reject_remote_options(request.endpoint_options, request.provider_options)
        tokens = self.loaded.model.tokenize(request.input, add_special=True, parse_special=False)
        if not tokens:
            raise InvalidRequestError("embedding input is empty after tokenization")
        limit = min(self._engine.n_ctx_slot, self.loaded.context.n_batch)
        if len(tokens) > limit:
            raise ContextOverflowError(
                f"embedding input is {len(tokens)} tokens; this load embeds at most {limit} "
                "(raise ContextRuntimeConfig.n_ctx / n_batch)"
            )
        normalize = bool(request.local.normalize) if request.local is not None else False
        self._engine.submit(EmbedJob(channel, tokens, normalize))

    # -- lifecycle --------------------------------------------------------------------
    def runtime_metrics(self) -> dict[str, Any]:
        return {**self._engine.runtime_metrics(), "backend": self.backend}

    def close(self) -> None:
        self._engine.close()


def _reject_remote_options(endpoint_options: Any, provider_options: Any) -> None:
    if endpoint_options:
        raise InvalidRequestError("endpoint_options are for gateway endpoints, not local ones")
    if provider_options:
        raise InvalidRequestError("provider_options are for provider endpoints, not local ones")
