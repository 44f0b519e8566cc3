"""`layout-retouch` command line: one sub-module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

# transformers' warnings (at import, about optional backends this project never uses) are noise on the
# command line: keep its errors. A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from layout_retouch.cli.options import Parser, quiet_libraries
from layout_retouch.errors import LayoutRetouchError

# Each entry is a module of this package that defines `register(subparsers)`; the parser it adds
# sets `func`, called with the parsed arguments. Add a command by adding its module here, with the
# command's name and one-line help (shown by `layout-retouch --help` without importing the module).
COMMANDS = {
    "generate": ("generate", "generate images of the personal subject with Layout-and-Retouch"),
    "demo": ("demo", "run the full method on the embedded toy world (no download, CPU)"),
    "personalize": ("personalize", "fine-tune a Stable Diffusion pipeline on photos of a subject"),
    "evaluate": ("evaluate", "generate and score methods over concepts, prompt sets and seeds (resumable)"),
    "toy-bench": ("toy_bench", "ablation I-V and trade-off sweep on the embedded toy world"),
    "toy-probes": ("toy_probes", "probe whether a toy world's self-attention carries structure"),
    "serve": ("serve", "a web page for Layout-and-Retouch (Gradio; the toy world by default)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` one command's full options and the others' names alone: a
    command's module imports torch and diffusers (seconds), which `--help` and errors should not wait for."""
    parser = Parser(
        prog="layout-retouch",
        description="Layout-and-Retouch: varied layouts for personalized Stable Diffusion, training-free.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{module_name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _command(argv: list[str]) -> str:
    """The command named in `argv` ('' for none): the first word that is one."""
    return next((a for a in argv if a in COMMANDS), "")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# Options whose value may start with "-" (argparse reads "--seeds -5,-1" as two options).
DASH_VALUES = ("--seeds",)
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def _attach_dash_values(argv: list[str]) -> list[str]:
    """ "--seeds -5,-1" -> "--seeds=-5,-1", so a negative seed gets the seed check's message."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in DASH_VALUES and re.fullmatch(r"-\d[\d,\s-]*", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"layout-retouch: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = _attach_dash_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(_command(argv)).parse_args(argv)
    with warnings.catch_warnings():  # a warning is one line, as an error is
        warnings.showwarning = _show_warning
        try:
            if not getattr(args, "checks_first", False):  # those that do call it once their inputs are checked
                quiet_libraries(getattr(args, "quiet", False))
            return int(args.func(args) or 0)
        except (LayoutRetouchError, FileNotFoundError) as err:
            print(f"layout-retouch {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:  # the system's part (a full disk, a lost mount): one line too, results kept whole
            print(f"layout-retouch {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            hint = getattr(args, "resume_hint", "")
            hint = hint() if callable(hint) else hint
            print(f"layout-retouch {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
            return INTERRUPTED
