"""The ``polyak`` command line.

Each feature registers its subcommands through an ``add_commands(subparsers)`` function in its own
module (listed in ``_COMMAND_MODULES``); handlers import their heavy dependencies lazily, so
``polyak --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that contribute subcommands. Each defines add_commands(subparsers) -> None; each parser sets
# `func` (args -> exit code) with set_defaults.
_COMMAND_MODULES: tuple[str, ...] = (
    "polyak.experiments.cli",
    "polyak.series.cli",
    "polyak.io.cli",
    "polyak.posthoc.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyak",
        description="Weight averaging for PyTorch: experiments, checkpoints and moving-average tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _version() -> str:
    from polyak import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"polyak {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `polyak inspect big.safetensors | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
