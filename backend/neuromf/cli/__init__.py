"""`neuromf <subcommand>`: the headless front end. Each subcommand is a thin call into the backend."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from neuromf.cli import data, demo, evaluate, generate, train


def build_parser() -> argparse.ArgumentParser:
    """The `neuromf` argument parser: one subcommand per `cmd_*` handler the command-group modules register."""
    parser = OneLineErrorParser(prog="neuromf", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", default=bool(os.environ.get("NEUROMF_DEBUG")),
                        help="print the full traceback of an unexpected error (also NEUROMF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND",
                                parser_class=OneLineErrorParser)

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # run_subcommand lets `demo` chain subcommands without importing this package back
        p.set_defaults(func=func, run_subcommand=main)
        return p

    for group in (data, train, generate, evaluate, demo):
        group.register(add)
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (`neuromf <cmd>: error: ...`, exit 2), like the rest."""

    def error(self, message: str):  # type: ignore[override]
        """Print the usage error as one line and exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages of libraries joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run one subcommand and return its exit code.

    Expected errors (config, volume, value, OS, a missing device) print one line naming the subcommand and return 2;
    Ctrl-C prints "interrupted" instead of a traceback. Anything else is a bug: one "internal error" line (exit 3)
    that says how to see the traceback (`--debug`), which `--debug` then prints.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from neuromf.config import ConfigError
    from neuromf.io.nifti import VolumeError

    try:
        if getattr(args, "device", None):  # a device that is not there: refused before any work
            from neuromf.utils import resolve_device

            resolve_device(args.device)
        return int(args.func(args) or 0)
    except (ConfigError, VolumeError, ValueError, OSError) as err:  # OSError: unreadable input, full disk, ...
        if args.debug:
            traceback.print_exc()
        print(f"neuromf {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuromf {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as err:  # a bug, not bad input: keep it visible, but as one line unless asked for more
        if args.debug:
            traceback.print_exc()
        print(f"neuromf {args.command}: internal error: {type(err).__name__}: {one_line(err)} (re-run with "
              "--debug for the traceback and report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
