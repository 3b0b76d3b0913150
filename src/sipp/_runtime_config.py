"""`NativeRuntimeConfig` and its groups: load-time settings of a local endpoint.

Each group is a frozen, keyword-only dataclass. `None` means "runtime default".
Fields the spec names but this runtime does not honour yet are still accepted
as names (so code written against the spec reads naturally) but setting them
raises `InvalidConfigError` saying so: a setting is never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from ._errors import InvalidConfigError
from ._types import real_number, shown

__all__ = [
    "CacheMode",
    "CacheRuntimeConfig",
    "ContextRuntimeConfig",
    "MultimodalRuntimeConfig",
    "NativeRuntimeConfig",
    "ObservabilityRuntimeConfig",
    "PlacementRuntimeConfig",
    "PoolingType",
    "ResidencyRuntimeConfig",
    "SamplingRuntimeConfig",
    "SchedulerRuntimeConfig",
]

PoolingType = Literal["mean", "cls", "last", "none"]
CacheMode = Literal["off", "live_slot_prefix", "snapshot"]
SAMPLER_NAMES: tuple[str, ...] = ("top_k", "top_p", "min_p", "temperature")


class _Group:
    """Rejects unknown or positional arguments with a typed error naming the valid fields."""

    _unsupported: ClassVar[Mapping[str, str]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        if args:
            raise InvalidConfigError(f"{cls.__name__} takes keyword arguments only")
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise InvalidConfigError(
                f"{cls.__name__}: unknown field {', '.join(unknown)}; "
                f"valid fields are {', '.join(valid)}"
            )
        for name, why in cls._unsupported.items():
            if kwargs.get(name) is not None:
                raise InvalidConfigError(
                    f"{cls.__name__}.{name} is not supported by this runtime yet ({why})"
                )
        return super().__new__(cls)

    def _where(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    def _int(self, name: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfigError(f"{self._where(name)} must be an integer, got {shown(value)}")
        if value < minimum:
            raise InvalidConfigError(
                f"{self._where(name)} must be >= {minimum}, got {shown(value)}"
            )
        if maximum is not None and value > maximum:
            raise InvalidConfigError(
                f"{self._where(name)} must be <= {maximum}, got {shown(value)}"
            )

    def _float(self, name: str, low: float, high: float = math.inf) -> None:
        value = getattr(self, name)
        if value is None:
            return
        if real_number(value) is None:
            raise InvalidConfigError(f"{self._where(name)} must be a number, got {shown(value)}")
        if not low <= value <= high:
            raise InvalidConfigError(
                f"{self._where(name)} must be between {low} and {high}, got {shown(value)}"
            )

    def _bool(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not isinstance(value, bool):
            raise InvalidConfigError(f"{self._where(name)} must be a bool, got {value!r}")

    def _choice(self, name: str, choices: Sequence[str]) -> None:
        value = getattr(self, name)
        if value is not None and value not in choices:
            raise InvalidConfigError(
                f"{self._where(name)} must be one of {', '.join(choices)}, got {value!r}"
            )


_NO_GPU_PLACEMENT = "this runtime places a model on one device"


@dataclass(frozen=True, kw_only=True)
class PlacementRuntimeConfig(_Group):
    """Where weights live. `use_extra_bufts=None` picks a safe default for the host
    (off on CPUs with AMX, where llama.cpp's AMX repack path crashes)."""

    _unsupported: ClassVar[Mapping[str, str]] = {
        "devices": _NO_GPU_PLACEMENT,
        "split_mode": _NO_GPU_PLACEMENT,
        "tensor_split": _NO_GPU_PLACEMENT,
        "fit_params": "automatic parameter fitting is not wired",
    }
    devices: Sequence[str] | None = None
    gpu_layers: int | None = None
    split_mode: str | None = None
    main_gpu: int | None = None
    tensor_split: Sequence[float] | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    fit_params: bool | None = None
    use_extra_bufts: bool | None = None

    def __post_init__(self) -> None:
        self._int("gpu_layers", -1)
        self._int("main_gpu", 0)
        for name in ("use_mmap", "use_mlock", "use_extra_bufts"):
            self._bool(name)


@dataclass(frozen=True, kw_only=True)
class ContextRuntimeConfig(_Group):
    """Context window and threads. `n_ctx` is per slot; `n_parallel` is the slot count."""

    n_ctx: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    n_parallel: int | None = None
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attention: bool | None = None
    offload_kqv: bool | None = None
    embeddings: bool | None = None
    pooling: PoolingType | None = None

    def __post_init__(self) -> None:
        self._int("n_ctx", 16)
        self._int("n_batch", 1)
        self._int("n_ubatch", 1)
        self._int("n_parallel", 1)
        self._int("n_threads", 1)
        self._int("n_threads_batch", 1)
        for name in ("flash_attention", "offload_kqv", "embeddings"):
            self._bool(name)
        self._choice("pooling", ("mean", "cls", "last", "none"))
        if self.pooling is not None and not self.embeddings:
            raise InvalidConfigError(
                "ContextRuntimeConfig.pooling only applies with embeddings=True"
            )


@dataclass(frozen=True, kw_only=True)
class SamplingRuntimeConfig(_Group):
    """Default sampling of an endpoint; `LocalTextOptions(sampling=...)` overrides per request.

    `samplers` orders the filtering stages (names from `top_k`, `top_p`, `min_p`,
    `temperature`); the final pick is always the seeded random draw, or greedy
    when the temperature is 0. `frequency_penalty` and `presence_penalty` (each in
    [-2, 2], as OpenAI defines them) lower the logit of every token already generated
    in this response by `frequency_penalty * count + presence_penalty`.
    """

    _unsupported: ClassVar[Mapping[str, str]] = {
        "mirostat": "mirostat sampling is not wired",
    }
    samplers: Sequence[str] | None = None
    seed: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    mirostat: int | None = None
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if self.samplers is not None:
            names = tuple(self.samplers)
            bad = [n for n in names if n not in SAMPLER_NAMES]
            if bad or len(set(names)) != len(names):
                raise InvalidConfigError(
                    "SamplingRuntimeConfig.samplers must list distinct names from "
                    f"{', '.join(SAMPLER_NAMES)}, got {list(names)!r}"
                )
            object.__setattr__(self, "samplers", names)
        # llama.cpp's seeds are 32-bit; a wider one would wrap, and 2**32 - 1 is its
        # "a random seed for every request".
        self._int("seed", 0, 2**32 - 1)
        self._int("top_k", 0)
        self._float("top_p", 0.0, 1.0)
        self._float("min_p", 0.0, 1.0)
        self._float("temperature", 0.0)
        self._float("repeat_penalty", 0.0)
        if self.repeat_penalty == 0:  # llama.cpp would divide positive logits by it
            raise InvalidConfigError(
                "SamplingRuntimeConfig.repeat_penalty must be > 0 (1.0 turns it off), got 0"
            )
        self._float("frequency_penalty", -2.0, 2.0)
        self._float("presence_penalty", -2.0, 2.0)
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, Mapping)
            or not all(
                isinstance(k, int) and not isinstance(k, bool) and real_number(v) is not None
                for k, v in self.logit_bias.items()
            )
        ):
            # NaN has no order: llama.cpp's greedy sampler and an argmax disagree on it.
            raise InvalidConfigError(
                "SamplingRuntimeConfig.logit_bias must map token ids (int) to numbers "
                "(not NaN; -inf bans a token)"
            )

    def merged_over(self, base: SamplingRuntimeConfig) -> SamplingRuntimeConfig:
        """This config's set fields on top of `base`."""
        values = {f.name: getattr(base, f.name) for f in fields(self)}
        values.update(
            {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if getattr(self, f.name) is not None
            }
        )
        return SamplingRuntimeConfig(**values)


@dataclass(frozen=True, kw_only=True)
class SchedulerRuntimeConfig(_Group):
    """How requests share the endpoint's slots.

    `policy` is `fifo` (requests start in arrival order). `prefill_chunk_size`
    caps one prompt's share of a step's batch (0 = no cap).
    """

    continuous_batching: bool | None = None
    policy: Literal["fifo"] | None = None
    prefill_chunk_size: int | None = None
    max_running_requests: int | None = None
    max_queued_requests: int | None = None

    def __post_init__(self) -> None:
        self._bool("continuous_batching")
        self._choice("policy", ("fifo",))
        self._int("prefill_chunk_size", 0)
        self._int("max_running_requests", 1)
        self._int("max_queued_requests", 0)


_NOT_WIRED = "not supported by this runtime yet; snapshots keep whole sequences"


@dataclass(frozen=True, kw_only=True)
class CacheRuntimeConfig(_Group):
    """KV reuse between requests.

    * `off`: every request prefills its whole prompt.
    * `live_slot_prefix` (default): a request reuses the longest token prefix an
      idle slot holds; its `context_key` pins the conversation to one slot.
    * `snapshot`: as above, and a sequence evicted from its slot is saved to a
      host-memory LRU store (`max_snapshot_entries`, default 16;
      `max_snapshot_bytes`, default 256 MiB) and restored on a later hit.
    """

    _unsupported: ClassVar[Mapping[str, str]] = {
        "retained_prefix_tokens": _NOT_WIRED,
        "snapshot_interval_tokens": _NOT_WIRED,
    }
    mode: CacheMode | None = None
    retained_prefix_tokens: int | None = None
    snapshot_interval_tokens: int | None = None
    max_snapshot_entries: int | None = None
    max_snapshot_bytes: int | None = None

    def __post_init__(self) -> None:
        self._choice("mode", ("off", "live_slot_prefix", "snapshot"))
        self._int("max_snapshot_entries", 0)
        self._int("max_snapshot_bytes", 0)
        if self.mode != "snapshot" and (
            self.max_snapshot_entries is not None or self.max_snapshot_bytes is not None
        ):
            raise InvalidConfigError(
                "CacheRuntimeConfig.max_snapshot_entries/max_snapshot_bytes need mode='snapshot'"
            )


@dataclass(frozen=True, kw_only=True)
class MultimodalRuntimeConfig(_Group):
    """The vision projector GGUF (mmproj) that lets a model read images in chat.

    `image_min_tokens` / `image_max_tokens` bound the embeddings one image becomes on
    projectors with dynamic resolution (llama.cpp ignores them on fixed-size ones).
    `use_gpu` runs the projector on the GPU; this build has none, so only False (or
    None) loads (checked at load, where the backend is known)."""

    projector_path: str | None = None
    use_gpu: bool | None = None
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.projector_path is not None and (
            not isinstance(self.projector_path, str) or not self.projector_path
        ):
            raise InvalidConfigError(
                "MultimodalRuntimeConfig.projector_path must be a non-empty path string"
            )
        self._bool("use_gpu")
        self._int("image_min_tokens", 1)
        self._int("image_max_tokens", 1)
        low, high = self.image_min_tokens, self.image_max_tokens
        if low is not None and high is not None and low > high:
            raise InvalidConfigError(
                f"MultimodalRuntimeConfig.image_min_tokens ({low}) exceeds "
                f"image_max_tokens ({high})"
            )
        for name in ("use_gpu", "image_min_tokens", "image_max_tokens"):
            if getattr(self, name) is not None and self.projector_path is None:
                raise InvalidConfigError(
                    f"MultimodalRuntimeConfig.{name} needs projector_path (the vision projector)"
                )


_NO_LEASES = "GPU residency leasing is not implemented in the Python runtime"


@dataclass(frozen=True, kw_only=True)
class ResidencyRuntimeConfig(_Group):
    _unsupported: ClassVar[Mapping[str, str]] = {
        "max_gpu_models_per_device": _NO_LEASES,
        "allow_cpu_models_while_gpu_loaded": _NO_LEASES,
        "require_gpu_lease": _NO_LEASES,
    }
    max_gpu_models_per_device: int | None = None
    allow_cpu_models_while_gpu_loaded: bool | None = None
    require_gpu_lease: bool | None = None


@dataclass(frozen=True, kw_only=True)
class ObservabilityRuntimeConfig(_Group):
    """`runtime_metrics` keeps per-endpoint counters; `backend_profiling` adds
    llama.cpp's own performance counters to every response's stats."""

    runtime_metrics: bool | None = None
    backend_profiling: bool | None = None

    def __post_init__(self) -> None:
        self._bool("runtime_metrics")
        self._bool("backend_profiling")


@dataclass(frozen=True, kw_only=True)
class NativeRuntimeConfig(_Group):
    """All load-time settings of a local endpoint, grouped by responsibility."""

    placement: PlacementRuntimeConfig = field(default_factory=PlacementRuntimeConfig)
    context: ContextRuntimeConfig = field(default_factory=ContextRuntimeConfig)
    sampling: SamplingRuntimeConfig = field(default_factory=SamplingRuntimeConfig)
    scheduler: SchedulerRuntimeConfig = field(default_factory=SchedulerRuntimeConfig)
    cache: CacheRuntimeConfig = field(default_factory=CacheRuntimeConfig)
    multimodal: MultimodalRuntimeConfig = field(default_factory=MultimodalRuntimeConfig)
    residency: ResidencyRuntimeConfig = field(default_factory=ResidencyRuntimeConfig)
    observability: ObservabilityRuntimeConfig = field(default_factory=ObservabilityRuntimeConfig)

    def __post_init__(self) -> None:
        for name, cls in _GROUPS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise InvalidConfigError(
                    f"NativeRuntimeConfig.{name} must be a {cls.__name__}, "
                    f"got {type(value).__name__}"
                )


_GROUPS: dict[str, type[_Group]] = {
    "placement": PlacementRuntimeConfig,
    "context": ContextRuntimeConfig,
    "sampling": SamplingRuntimeConfig,
    "scheduler": SchedulerRuntimeConfig,
    "cache": CacheRuntimeConfig,
    "multimodal": MultimodalRuntimeConfig,
    "residency": ResidencyRuntimeConfig,
    "observability": ObservabilityRuntimeConfig,
}


def runtime_config_from_mapping(data: Mapping[str, Any]) -> NativeRuntimeConfig:
    """Build a `NativeRuntimeConfig` from nested mappings (TOML, JSON): `{"context": {"n_ctx": 2048}}`.

    Errors name the group, e.g. `context: ContextRuntimeConfig.n_ctx must be >= 16`."""
    if not isinstance(data, Mapping):
        raise InvalidConfigError("runtime must be a table of groups")
    groups: dict[str, Any] = {}
    for name, value in data.items():
        cls = _GROUPS.get(name)
        if cls is None:
            raise InvalidConfigError(
                f"{name}: unknown runtime group; valid groups are {', '.join(_GROUPS)}"
            )
        if not isinstance(value, Mapping):
            raise InvalidConfigError(f"{name}: must be a table")
        try:
            groups[name] = cls(**value)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"{name}: {exc.message}") from None
    return NativeRuntimeConfig(**groups)
