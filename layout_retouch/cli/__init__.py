"""`layout-retouch` command line: one sub-module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# transformers warns at import about optional image backends (torchvision) this project never uses;
# keep its errors, drop that noise. A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from layout_retouch.errors import LayoutRetouchError

# Each entry is a module of this package that defines `register(subparsers)`; the parser it adds
# sets `func`, called with the parsed arguments. Add a command by adding its module here.
COMMANDS = ["generate", "demo", "personalize", "evaluate", "toy_bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layout-retouch",
        description="Layout-and-Retouch: varied layouts for personalized Stable Diffusion, training-free.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # loading bars; our own bars show the work
    try:
        return int(args.func(args) or 0)
    except (LayoutRetouchError, FileNotFoundError) as err:
        print(f"layout-retouch {args.command}: error: {err}", file=sys.stderr)
        return 2
