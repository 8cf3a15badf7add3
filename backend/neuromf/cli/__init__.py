"""`neuromf <subcommand>`: the headless front end. Each subcommand is a thin call into the backend."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from neuromf.cli import data, demo, evaluate, generate, train


def build_parser() -> argparse.ArgumentParser:
    """The `neuromf` argument parser: one subcommand per `cmd_*` handler the command-group modules register."""
    parser = argparse.ArgumentParser(prog="neuromf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # run_subcommand lets `demo` chain subcommands without importing this package back
        p.set_defaults(func=func, run_subcommand=main)
        return p

    for group in (data, train, generate, evaluate, demo):
        group.register(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run one subcommand and return its exit code.

    Expected errors (config, volume, value, OS) print one line naming the subcommand and return 2; Ctrl-C prints
    "interrupted" instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from neuromf.config import ConfigError
    from neuromf.io.nifti import VolumeError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, VolumeError, ValueError, OSError) as err:  # OSError: unreadable input, full disk, ...
        print(f"neuromf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuromf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
