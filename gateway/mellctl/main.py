"""Entry point of `mellctl`: builds the argument parser from the command-group modules.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and
sets `func(args) -> int` on each. Exit codes: 0 ok, 1 failure (or the gateway answered with an
error), 2 usage, 3 gateway unreachable; each failure prints one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mell.common.errors import MellError
from mell.gateway.mellctl.client import Unreachable

# Command groups, in help order. Each name is a module of this package.
COMMAND_MODULES: tuple[str, ...] = (
    "up",
    "admin",
    "migrate",
    "model",
    "journal",
    "events",
    "simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mellctl", description="Run and operate a mell cluster.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"mell.gateway.mellctl.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Unreachable as err:
        print(f"mellctl: error: {err.message}", file=sys.stderr)
        return 3
    except MellError as err:
        print(f"mellctl: error: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
