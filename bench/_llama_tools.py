"""llama.cpp's own C++ tools, built from the llama.cpp that the pinned llama-cpp-python vendors.

The benchmarks compare sipp with llama.cpp's command-line tools (`llama-bench`,
`llama-batched-bench`, `llama-server`, `llama-mtmd-cli`). Comparing against a figure measured once
elsewhere hides drift, so this builds the tools from the same sources as the
`llama_cpp` wheel in use (its sdist vendors llama.cpp under vendor/llama.cpp)
with the cmake flags `./dev` builds that wheel with, and caches them under
~/.cache/sipp/llama-tools-<version>-<key>/bin, the key hashed from version and
flags exactly as `./dev` keys its wheel cache. Building takes about 8 minutes
on 2 cores, once.

    python bench/_llama_tools.py        # build (or find) the tools, print their directory
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

# The tools must run the same ggml as the wheel sipp loads, or a comparison measures a
# build difference: the version is the installed wheel's, the flags are ./dev's
# (it exports SIPP_LLAMA_CMAKE_ARGS; the default here is its default).
DEFAULT_CMAKE_ARGS = "-DGGML_OPENMP=OFF"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-mtmd-cli")
# What llama-cpp-python's own CMakeLists forces for the wheel (shared libs, no curl),
# plus what keeps a build offline and short: no web UI download, no TLS, no tests/examples.
_FIXED_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


def cmake_args() -> str:
    return os.environ.get("SIPP_LLAMA_CMAKE_ARGS", DEFAULT_CMAKE_ARGS)


def llama_version() -> str:
    return metadata.version("llama_cpp_python")


def tools_dir() -> Path:
    version, flags = llama_version(), cmake_args()
    key = hashlib.sha256(f"{version}|{flags}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SIPP_CACHE_DIR", Path.home() / ".cache" / "sipp"))
    return cache / f"llama-tools-{version}-{key}" / "bin"


def _log(message: str) -> None:
    print(f"[llama-tools] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"llama.cpp tools build failed ({cmd[0]}), see {log}:\n" + "\n".join(tail))


def ensure_tools() -> Path:
    """Directory holding the built tools, building them first if the cache lacks any."""
    bin_dir = tools_dir()
    # A cache from before a tool joined TOOLS gets just the missing ones added.
    missing = [tool for tool in TOOLS if not (bin_dir / tool).is_file()]
    if not missing:
        return bin_dir
    root = bin_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    _log(
        f"building {', '.join(missing)} from llama-cpp-python {llama_version()}'s vendored "
        f"llama.cpp ({cmake_args()}); about 8 minutes on 2 cores, once; log: {log}"
    )
    with tempfile.TemporaryDirectory(prefix="sipp-llama-tools-") as tmp:
        work = Path(tmp)
        _log("downloading the sdist")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(work),
                f"llama-cpp-python=={llama_version()}",
            ],
            log,
        )
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        _log("configuring")
        _run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                *_FIXED_ARGS,
                *shlex.split(cmake_args()),
            ],
            log,
        )
        _log("compiling (the slow part)")
        _run(["cmake", "--build", str(build), "-j2", "--target", *missing], log)
        staging = root / "bin.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # The tools link the shared ggml/llama libraries; their rpath points into the build
        # tree, so copy the libraries next to them and let the loader find them there.
        for built in (build / "bin").iterdir():
            if built.name in missing or ".so" in built.name:
                shutil.copy2(built, staging / built.name, follow_symlinks=True)
        if not bin_dir.is_dir():
            staging.rename(bin_dir)
        else:  # tools already there keep running: only what they lack is added
            for built in staging.iterdir():
                if not (bin_dir / built.name).exists():
                    built.rename(bin_dir / built.name)
            shutil.rmtree(staging, ignore_errors=True)
    _log(f"tools ready in {bin_dir}")
    return bin_dir


def tool_env() -> dict[str, str]:
    """Environment for running a built tool: its shared libraries sit beside it."""
    env = dict(os.environ)
    bin_dir = str(tools_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("LD_LIBRARY_PATH")) if p)
    return env


if __name__ == "__main__":
    print(ensure_tools())
