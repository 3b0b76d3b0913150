"""`sipp-gateway`: the first-party gateway's command line.

sipp-gateway check --config FILE     validate the TOML (no env reads, no loads, no binds)
"""

from __future__ import annotations

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
