"""`sipp-gateway`: the first-party gateway's command line.

sipp-gateway check --config FILE     validate the TOML (no env reads, no loads, no binds)
sipp-gateway cache calibrate ...     measure semantic-cache thresholds on a labelled set
"""

from __future__ import annotations

import os
import sys

import click

from .._errors import SippError
from ..gateway.config import ConfigError, GatewayConfig, LocalTarget, load_config

__all__ = ["main"]


_config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Gateway TOML file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sipppy", prog_name="sipp-gateway")
def cli() -> None:
    """Sipp gateway server: one HTTP boundary for local GGUF and provider targets."""


@cli.command()
@_config_option
def check(config_path: str) -> None:
    """Validate the TOML only: no env vars are read, no model is loaded, nothing binds.

    Prints every problem as `toml.path: rule` and exits 1, or a summary and exits 0.
    """
    config = _load_or_exit(config_path)
    local = [t.name for t in config.targets if isinstance(t, LocalTarget)]
    remote = [t.name for t in config.targets if not isinstance(t, LocalTarget)]
    click.echo(
        f"{config_path}: ok ({len(config.targets)} targets: {len(local)} local, {len(remote)} provider; "
        f"{len(config.tokens)} tokens; public {config.public_bind[0]}:{config.public_bind[1]}, "
        f"management {config.management_bind[0]}:{config.management_bind[1]})"
    )


@cli.command()
@_config_option
def serve(config_path: str) -> None:
    """Serve the public and management listeners until SIGINT/SIGTERM.

    Reads the secrets the TOML names from the environment (missing, blank, or a bearer
    token with whitespace: refuses to start), binds both listeners, then loads targets;
    /readyz answers `ready` once every target is loaded. Logs are JSON lines on stderr
    (level from $SIPP_GATEWAY_LOG, default info). On a signal it stops accepting, lets
    in-flight requests finish (30 s grace), frees models and exits 0.
    """
    import asyncio
    import os

    from ..gateway.serve import configure_logging
    from ..gateway.serve import serve as run_server

    config = _load_or_exit(config_path)
    configure_logging(os.environ)
    try:
        code = asyncio.run(run_server(config))
    except SippError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    sys.exit(code)


@cli.group()
def cache() -> None:
    """Response cache tools."""


@cache.command()
@_config_option
@click.option(
    "--embedding-target",
    "embedding_target",
    metavar="NAME",
    help="The local target (a sentence-embedding GGUF such as all-MiniLM-L6-v2) that embeds "
    "for the semantic cache.",
)
@click.option(
    "--target-false-hit-rate",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Largest acceptable share of must-not-hit pairs served from the cache.",
)
@click.option(
    "--pairs",
    "pairs_path",
    type=click.Path(dir_okay=False),
    help="Your own labelled pairs (JSON lines: query, cached, expect hit|miss, kind); "
    "default: the set shipped with Sipp.",
)
@click.option("--min-threshold", type=click.FloatRange(-1, 1), default=0.70, show_default=True)
@click.option("--max-threshold", type=click.FloatRange(-1, 1), default=0.99, show_default=True)
@click.option("--step", type=click.FloatRange(0.001, 1), default=0.01, show_default=True)
def calibrate(
    config_path: str,
    embedding_target: str | None,
    target_false_hit_rate: float,
    pairs_path: str | None,
    min_threshold: float,
    max_threshold: float,
    step: float,
) -> None:
    """Measure semantic-cache thresholds on a labelled set and recommend one.

    Loads the embedding target's model from the TOML (nothing binds, no provider is
    called), embeds both sides of every pair, and prints per similarity threshold the
    precision, recall and false-hit rate with the guard (negation / number / antonym
    check) on and off. Recommends the lowest threshold whose false-hit rate, guard on,
    is within --target-false-hit-rate, and exits 0; exits 1 when none is.

    \b
    Example:
      sipp-gateway cache calibrate --config gateway.toml --embedding-target minilm
    """
    from ..gateway.cache import calibration as cal

    config = _load_or_exit(config_path)
    try:
        grid = cal.thresholds(min_threshold, max_threshold, step)
        target = cal.embedding_target(config, embedding_target)
        pairs = cal.load_pairs(pairs_path)
        texts = sorted({t for p in pairs for t in (p.query, p.cached)})
        click.echo(f"embedding {len(texts)} texts with target {target.name} ...", err=True)
        vectors = dict(zip(texts, cal.embed_with_target(target, texts)))
    except SippError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    _, rows = cal.calibrate(
        pairs, [vectors[p.query] for p in pairs], [vectors[p.cached] for p in pairs], grid
    )
    best = cal.recommend(rows, target_false_hit_rate)
    model = f"target {target.name} ({os.path.basename(target.model)})"
    click.echo(
        cal.format_report(rows, best, target_false_hit_rate, model=model, pair_count=len(pairs))
    )
    sys.exit(0 if best is not None else 1)


def _load_or_exit(config_path: str) -> GatewayConfig:
    """The parsed config, or every problem on stderr (one `error: path: rule` line each) and exit 1."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        click.echo(f"{config_path}: {len(exc.problems)} problem(s)", err=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="sipp-gateway")


if __name__ == "__main__":
    main()
