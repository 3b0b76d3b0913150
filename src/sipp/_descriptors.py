"""Endpoint descriptors (what to register) and `EndpointRef` (what `add` returns)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from ._errors import InvalidConfigError
from ._runtime_config import NativeRuntimeConfig

__all__ = ["EndpointDescriptor", "EndpointKind", "EndpointRef", "LocalModelDescriptor"]

EndpointKind = Literal["local", "gateway", "provider"]


@dataclass(frozen=True)
class EndpointRef:
    """A lightweight handle naming a registered endpoint: `(kind, id)`."""

    kind: EndpointKind
    id: str


@dataclass(frozen=True)
class LocalModelDescriptor:
    """A GGUF model run inside this process: `LocalModelDescriptor("model.gguf", config)`."""

    model_path: str | os.PathLike[str]
    config: NativeRuntimeConfig = field(default_factory=NativeRuntimeConfig)
    kind: Literal["local"] = field(default="local", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, (str, os.PathLike)) or str(self.model_path) == "":
            raise InvalidConfigError("LocalModelDescriptor needs a model path")
        if self.config is None:
            object.__setattr__(self, "config", NativeRuntimeConfig())
        elif not isinstance(self.config, NativeRuntimeConfig):
            raise InvalidConfigError(
                "LocalModelDescriptor.config must be a NativeRuntimeConfig, "
                f"got {type(self.config).__name__}"
            )

    @property
    def path(self) -> Path:
        return Path(os.fspath(self.model_path))


EndpointDescriptor: TypeAlias = LocalModelDescriptor
