"""`layout-retouch serve`: the web app (Gradio), on the shipped toy world unless models are named.

With no flag it loads the toy world exactly as `layout-retouch demo` does (no download, CPU); the model
options are `generate`'s, and the method options set the page's starting values.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from layout_retouch.cli.options import (
    HelpFormatter,
    add_method_options,
    add_model_options,
    add_threads_option,
    check_output_folder,
    config_from_args,
    set_threads,
)
from layout_retouch.errors import LayoutRetouchError

MODEL_FIELDS = ("base", "base_config", "personalized", "personalization", "token", "class_word", "allow_pickle",
                "device", "dtype", "offload", "fuse_qkv")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a web page for Layout-and-Retouch (Gradio; the toy world by default)",
                       description="Serve Layout-and-Retouch in the browser. Without --base it runs on the shipped "
                       "toy world (no download). Needs the web extra: pip install -e '.[web]'.",
                       formatter_class=HelpFormatter)
    add_model_options(p, base_required=False)
    add_method_options(p)
    g = p.add_argument_group("page")
    g.add_argument("--reference", action="append",
                   help="a reference photo offered in the page (repeatable); without --base, the toy world's photos")
    g.add_argument("--prompt", help="the page's first prompt; an example with the token if not given")
    g.add_argument("--out", help="folder for the PNGs the page makes; a new temporary folder if not given")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_threads_option(p)
    p.set_defaults(func=run)


def toy_world_defaults(args) -> list[Path]:
    """Fill the model options with the toy world's (as `demo` loads it); its reference photos."""
    from layout_retouch.toyworld.world import CLASS_WORD, TOKEN, TOY_METHOD, TOY_MODELS, TOY_SETTINGS, find_toy_models

    base, tuned, _ = find_toy_models(args.personalized or "sks_star_dreambooth")
    args.base, args.personalized = str(base), str(tuned)
    args.token = args.token or TOKEN
    args.class_word = args.class_word or CLASS_WORD
    # the toy UNet's settings and those this world's measurements pick (as `demo` runs them), unless given
    for name, value in {**TOY_METHOD, **TOY_SETTINGS}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return sorted((TOY_MODELS / "references").glob("*.png"))


def example_prompt(token: str | None, class_word: str | None, toy: bool) -> str:
    if toy:
        return f"a photo of a {token} {class_word} in the snow"
    subject = " ".join(w for w in (token, class_word) if w) or "dog"
    return f"a photo of a {subject} on the beach"


def load(args):
    """The web engine for the parsed options: models loaded once, through generate's loader."""
    from layout_retouch.pipeline import load_pipeline_from_args
    from layout_retouch.web.engine import WebEngine, WebModels

    toy = args.base is None
    references = toy_world_defaults(args) if toy else []
    references = [Path(r) for r in args.reference or []] or references
    for path in references:
        if not path.is_file():
            raise LayoutRetouchError(f"reference photo {path} does not exist")
    defaults = config_from_args(args)  # checked before the models load
    if args.out:
        check_output_folder(args.out)
    pipe = load_pipeline_from_args(args)
    pipe.progress = False
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="layout-retouch-web-"))
    out.mkdir(parents=True, exist_ok=True)
    model_args = argparse.Namespace(**{k: getattr(args, k) for k in MODEL_FIELDS})
    title = "Layout-and-Retouch (toy world)" if toy else "Layout-and-Retouch"
    return WebEngine(WebModels(pipe, model_args, defaults, references,
                               args.prompt or example_prompt(args.token, args.class_word, toy), out.resolve(), title))


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be listened on before the models load (Gradio would say so only after)."""
    if not 0 < port < 65536:
        raise LayoutRetouchError(f"--port must lie in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port is free
            probe.bind((host, port))
    except OSError as err:
        raise LayoutRetouchError(f"cannot listen on {host}:{port} ({err.strerror or err}); pass another --port "
                                 "or --host") from err


def run(args) -> int:
    try:
        from layout_retouch.web.app import launch
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("gradio", "gradio_client"):
            raise LayoutRetouchError("the web app needs Gradio: pip install -e '.[web]'") from err
        raise
    check_port(args.host, args.port)
    set_threads(args.threads)
    engine = load(args)
    print(f"layout-retouch serve: models loaded, images go to {engine.models.out}", flush=True)
    launch(engine, args.host, args.port)
    return 0
