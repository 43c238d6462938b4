"""The ``polyak`` command line.

Each feature registers its subcommands through an ``add_commands(subparsers)`` function in its own
module (listed in ``_COMMAND_MODULES``); handlers import their heavy dependencies lazily, so
``polyak --help`` stays fast. The examples at the end of every subcommand's ``--help`` live here, in
``EXAMPLES``, so that one test can check each of them parses and that no subcommand lacks one.
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

# Shown under "examples:" at the end of `polyak COMMAND --help`; tests/test_cli_help.py parses every line.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "demo": (
        "polyak demo                                   # quick regression + digits report in reports/demo",
        "polyak demo --seeds 4 --out /tmp/demo --quiet",
    ),
    "experiment": (
        "polyak experiment regression --seeds 10      # report in reports/regression",
        "polyak experiment sweep --decay 0.99 0.999 --quick",
        "polyak experiment compare --dataset mnist1d --json > summary.json",
        "polyak experiment posthoc --quick --json > posthoc.json   # post-hoc vs exact EMA per width",
    ),
    "report": ("polyak report reports/regression/results.json --out /tmp/regression",),
    "smooth": (
        "polyak smooth train_log.csv --column loss --span 20 --out smoothed.csv",
        "polyak smooth metrics.jsonl --column val_acc --method kalman --plot val_acc.png",
    ),
    "inspect": (
        "polyak inspect ckpt.safetensors",
        "polyak inspect ckpt.safetensors --json > ckpt.json   # the same, for scripts",
        "polyak inspect yolo_last.pt --trust-pickle      # UNSAFE unless you made the file",
    ),
    "extract": (
        "polyak extract ckpt.safetensors -o model.safetensors",
        "polyak extract ckpt.safetensors -o model_slow.pt --index 1   # the second decay",
    ),
    "convert": (
        "polyak convert timm_ema.pth --to polyak -o ema.safetensors",
        "polyak convert ckpt.safetensors --to ema_pytorch -o ema_pytorch.pt",
    ),
    "posthoc": (
        "polyak posthoc snapshots/ --sigma-rel 0.07 -o model.safetensors",
        "polyak posthoc snapshots/ --sigma-rel 0.05 -o model.safetensors --quiet   # no progress line",
    ),
}


# The extra that brings a command's optional dependencies (named when one is missing).
_EXTRAS: dict[str, str] = {"smooth": "series"}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that the examples keep their lines (descriptions are still wrapped)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyak",
        description="Weight averaging for PyTorch: experiments, checkpoints and moving-average tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    for command, subparser in sub.choices.items():
        examples = EXAMPLES.get(command)
        if examples:
            subparser.formatter_class = _HelpFormatter
            subparser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser.epilog = "Run `polyak COMMAND --help` for a command's options and examples."
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
    except ModuleNotFoundError as exc:  # an optional dependency of this command is not installed
        extra = _EXTRAS.get(args.command, "experiments")
        print(
            f"polyak {args.command}: error: it needs {exc.name or 'a package'!r}, which is not installed; "
            f"install the extra: pip install 'polyak[{extra}]'",
            file=sys.stderr,
        )
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
