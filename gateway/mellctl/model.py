"""`mellctl model …`: offline model tools. `init-tiny DIR [--seed N]` writes mell-tiny."""

from __future__ import annotations

import argparse
from pathlib import Path

from mell.common.errors import ConfigError
from mell.common.tiny_model import write_tiny_model


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="offline model tools")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    tiny = sub.add_parser(
        "init-tiny",
        help="write the built-in mell-tiny checkpoint (random weights, byte-level BPE)",
        description="Write mell-tiny into DIR. The same seed gives byte-identical files.",
    )
    tiny.add_argument("directory", metavar="DIR", type=Path)
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.set_defaults(func=_init_tiny)


def _init_tiny(args: argparse.Namespace) -> int:
    try:
        directory = write_tiny_model(args.directory, args.seed)
    except OSError as err:  # a file in the way, no permission, a full disk
        raise ConfigError(f"cannot write mell-tiny into {args.directory}: {err.strerror}") from None
    print(f"mell-tiny (seed {args.seed}) written to {directory}")
    return 0
