"""The ``mmsb`` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from .errors import MMSBError

__all__ = ["main"]


class _Group(click.Group):
    """Turns MMSB errors into one clear line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MMSBError as exc:
            click.echo(f"mmsb: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"mmsb: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsb")
def main() -> None:
    """MMSB, the Memory-Mapped State Bus: inspect, replay, verify and benchmark a bus."""


@main.command()
@click.option("--path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run on a durable bus in this directory (created if missing) instead of in memory.")
def demo(path: Path | None) -> None:
    """Run the guided demo: pages, a dependency, writes, propagation, replay,
    checkpoint and restore, stats."""
    from .demo import run_demo

    run_demo(path, Console())


def _attach_optional_commands() -> None:
    from .bench.command import bench_command

    main.add_command(bench_command)


_attach_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
