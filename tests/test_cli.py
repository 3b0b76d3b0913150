"""The `sipp` command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _sipp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipp.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_shows_both_usages() -> None:
    proc = _sipp("--help")
    assert proc.returncode == 0
    assert "sipp MODEL" in proc.stdout and "models pull" in proc.stdout
    run_help = _sipp("run", "--help")
    for flag in ("--chat", "--max-tokens", "--ctx-size", "--backend", "--temperature", "--stats"):
        assert flag in run_help.stdout


def test_streams_a_chat_answer_with_stats(smollm_path: Path) -> None:
    proc = _sipp(
        str(smollm_path),
        "What color is the sky?",
        "--chat",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ctx-size",
        "512",
        "--stats",
        "basic",
        "--backend",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    for row in ("prompt tokens", "generated tokens", "prefill ms", "decode tokens/s"):
        assert row in proc.stderr


def test_profile_stats_include_llama_counters(smollm_path: Path) -> None:
    proc = _sipp(str(smollm_path), "Hello", "--max-tokens", "4", "--stats", "profile")
    assert proc.returncode == 0, proc.stderr
    assert "llama.cpp eval_ms" in proc.stderr


def test_cached_model_name_resolves(smollm_path: Path) -> None:
    proc = _sipp(
        "smollm2-135m-instruct",
        "Hi",
        "--max-tokens",
        "2",
        env={"SIPP_MODELS_DIR": str(smollm_path.parent)},
    )
    assert proc.returncode == 0, proc.stderr


def test_errors_are_one_readable_line_and_nonzero(tmp_path: Path, gemma_path: Path) -> None:
    missing = _sipp(str(tmp_path / "missing.gguf"), "hi")
    assert missing.returncode == 1
    assert "model file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_template = _sipp(str(gemma_path), "hi", "--chat", "--max-tokens", "2")
    assert no_template.returncode == 1
    assert "chat_template" in no_template.stderr and "Traceback" not in no_template.stderr
    bad_flag = _sipp(str(gemma_path), "hi", "--max-tokens", "-3")
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr


def test_models_list_and_pull(smollm_path: Path) -> None:
    env = {"SIPP_MODELS_DIR": str(smollm_path.parent), "COLUMNS": "200"}
    listing = _sipp("models", "list", env=env)
    assert listing.returncode == 0
    assert "smollm2-135m-instruct" in listing.stdout and "gemma3-270m" in listing.stdout
    pulled = _sipp("models", "pull", "smollm2-135m-instruct", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(smollm_path)
    unknown = _sipp("models", "pull", "gpt-17", env=env)
    assert unknown.returncode == 1 and "unknown model" in unknown.stderr
