"""The Gradio page over `WebEngine`: fields in, a gallery, PNG downloads and one status line out.

Gradio is imported here only (the `web` extra). The page runs one generation at a time (Gradio's queue
with a concurrency of one); Stop has its own queue, so it is answered at once, and ends the current run
between two steps.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the machine may have no network

import gradio as gr  # noqa: E402

from layout_retouch.web.engine import MASKS, MAX_IMAGES, METHODS, Outcome, WebEngine, run_request  # noqa: E402

# Small images (the toy world's are 64 px) are enlarged without blur; fonts are the system's, not a download.
CSS = "#gallery img, #reference img { image-rendering: pixelated; } #status.error { color: #b00020; }"
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
FIELDS = ("reference", "prompts", "seeds", "num_images", "method", "vanilla_steps", "ref_start_step",
          "mask_start_step", "tau", "steps", "guidance", "target_start", "compare", "show_masks")


def reference_path(payload) -> str | None:
    """The uploaded file's path from the image box's raw value (the page skips Gradio's own decoding, so
    an unreadable file reaches the pipeline's check and its clear message)."""
    if payload is None or payload == "":
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return str(getattr(payload, "path", payload))


def number(value):
    """A number box's raw value: None when empty (the engine names a value it cannot use)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def page_outputs(outcome: Outcome) -> tuple:
    """The gallery, the download list and the status line for one outcome."""
    gallery = gr.Gallery(value=[(str(t.path), t.caption) for t in outcome.tiles] or None, columns=outcome.columns)
    files = [str(t.path) for t in outcome.tiles] or None
    status = gr.Markdown(value=outcome.message, elem_classes=[] if outcome.ok else ["error"])
    return gallery, files, status


def build_app(engine: WebEngine) -> gr.Blocks:
    models = engine.models
    defaults = models.defaults
    subject = f"`{models.token}`" if models.token else "no token"

    def generate(*values, progress=gr.Progress()):  # noqa: B008 (Gradio finds its progress bar by this default)
        fields = dict(zip(FIELDS, values, strict=True))
        fields["reference"] = reference_path(fields["reference"])
        for name in ("num_images", "vanilla_steps", "ref_start_step", "mask_start_step", "tau", "steps", "guidance"):
            fields[name] = number(fields[name])

        def report(step):
            progress(step.fraction, desc=step.text)

        for outcome in run_request(engine, fields, report):
            yield page_outputs(outcome)

    def started():
        waiting = "Waiting for the generation before it to end..." if engine.busy else "Starting..."
        return None, None, gr.Markdown(value=waiting, elem_classes=[])

    def stop():
        # A toast, not the status line: the run's own "Stopped ..." must be the status's last word.
        gr.Info("Stopping after the current step..." if engine.stop() else "Nothing is running.")

    # Gradio's copies of uploads and results are dropped after a day (the PNGs stay in the --out folder).
    with gr.Blocks(title=models.title, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"# {models.title}\nPersonal subject {subject}, class word `{models.pipe.models.class_word}`. "
                    "Stage 1 takes the layout from the base model, Stage 2 retouches the subject from the "
                    "reference photo (arXiv 2407.09779).")
        with gr.Row():
            with gr.Column(scale=2):
                reference = gr.Image(value=str(models.references[0]) if models.references else None, type="filepath",
                                     sources=["upload"], label="Reference photo (methods III-V)", elem_id="reference",
                                     height=200)
                if models.references:
                    gr.Examples([[str(p)] for p in models.references], inputs=[reference],
                                label="Or pick one of these photos")
                prompts = gr.Textbox(value=models.example_prompt, lines=3, elem_id="prompts",
                                     label=f"Prompts, one per line, with the personal token {subject}")
                with gr.Row():
                    seeds = gr.Textbox(value="42", label="Seeds (comma-separated)", elem_id="seeds")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images per prompt and seed")
                method = gr.Radio([(label, key) for key, label in METHODS.items()], value=defaults.method,
                                  label="Method (the paper's Table 4 rows)", elem_id="method")
                compare = gr.Checkbox(label="Compare rows: I, II and V on the same seed, side by side",
                                      elem_id="compare")
                show_masks = gr.Checkbox(label=f"Show the masks ({', '.join(MASKS)}) and the reference's "
                                         "reconstruction", elem_id="show_masks")
                with gr.Accordion("Hyperparameters", open=True):
                    steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, label="DDIM steps",
                                      elem_id="steps")
                    guidance = gr.Slider(1, 20, value=defaults.guidance_scale, step=0.5, label="Guidance (CFG)")
                    vanilla_steps = gr.Number(value=defaults.vanilla_steps, label="T_l: vanilla steps, a count (5) "
                                              "or a fraction of the steps (0.1)")
                    ref_start_step = gr.Number(value=defaults.ref_start_step, precision=0, label="S_ref")
                    mask_start_step = gr.Textbox(value="" if defaults.mask_start_step is None
                                                 else str(defaults.mask_start_step), placeholder="= S_ref",
                                                 label="S_mask (empty: = S_ref)")
                    tau = gr.Slider(0, 0.99, value=defaults.tau, step=0.01, label="tau (mask threshold)")
                    target_start = gr.Radio([("noise z_T (the paper's)", "noise"),
                                             ("the layout's latent at T_l (not the paper's)", "layout")],
                                            value=defaults.target_start, label="Stage 2's target starts from",
                                            elem_id="target_start")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", columns=2, elem_id="gallery",
                                     object_fit="contain", height="auto")
                files = gr.File(label="PNG downloads (each with its parameters in the PNG text chunk)",
                                file_count="multiple", elem_id="downloads", interactive=False)
        inputs = [reference, prompts, seeds, num_images, method, vanilla_steps, ref_start_step, mask_start_step, tau,
                  steps, guidance, target_start, compare, show_masks]
        # Compare rows runs its own methods (I and V): the method choice is greyed out meanwhile.
        compare.change(lambda on: gr.Radio(interactive=not on), inputs=[compare], outputs=[method], queue=False,
                       api_visibility="private", show_progress="hidden")
        # At once, outside the queue, the page drops the last results and says the press was taken; then the run.
        pressed = run.click(started, outputs=[gallery, files, status], queue=False, api_visibility="private",
                            show_progress="hidden")
        pressed.then(generate, inputs=inputs, outputs=[gallery, files, status], preprocess=False,
                     concurrency_limit=1, concurrency_id="generate", api_name="generate", show_progress_on=[gallery])
        # Stop has a queue of its own (unlimited), so it is answered while a generation holds the other.
        halt.click(stop, api_name="stop", show_progress="hidden", concurrency_limit=None, concurrency_id="stop")
    app.queue(default_concurrency_limit=1)
    return app


def launch(engine: WebEngine, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; the reference photos' and the results' folders are the only files it may hand out."""
    app = build_app(engine)
    allowed = [str(engine.models.out), *{str(Path(p).resolve().parent) for p in engine.models.references}]
    app.launch(server_name=host, server_port=port, allowed_paths=allowed, ssr_mode=False, theme=THEME, css=CSS,
               prevent_thread_lock=not block, inbrowser=False, share=False, footer_links=[], max_file_size="50mb")
    return app
