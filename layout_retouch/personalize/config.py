"""Every setting of the `personalize` command in one place, with where each default comes from.

"diffusers" marks the default of the diffusers example training scripts (examples/dreambooth,
examples/textual_inversion and their READMEs); "[choice]" marks a value of ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from layout_retouch.errors import LayoutRetouchError

MethodName = Literal["dreambooth", "lora", "textual_inversion"]
METHODS: tuple[str, ...] = ("dreambooth", "lora", "textual_inversion")

# Steps and learning rates of the diffusers examples' README commands for SD 1.x at batch 1:
# DreamBooth 400 steps at 5e-6, DreamBooth-LoRA 500 steps at 1e-4, Textual Inversion 3000 steps
# at 5e-4 (the README scales it by batch x accumulation; we leave scaling to the user).
DEFAULT_MAX_STEPS: dict[str, int] = {"dreambooth": 400, "lora": 500, "textual_inversion": 3000}
DEFAULT_LEARNING_RATES: dict[str, float] = {"dreambooth": 5e-6, "lora": 1e-4, "textual_inversion": 5e-4}

# The prompt every subject photo is paired with (DreamBooth paper / diffusers: "a photo of sks dog").
DEFAULT_PROMPT_TEMPLATE = "a photo of {token} {class_word}"


@dataclass
class PersonalizeConfig:
    """What to fine-tune, on which photos, and how; `resolved()` fills the per-method defaults."""

    method: MethodName
    base: str  # a diffusers StableDiffusionPipeline folder or hub id
    photos: str  # folder of subject photos (every image file in it)
    output: str  # where the personalized model is written
    token: str = "sks"  # DreamBooth/LoRA: a rare existing word; Textual Inversion: a new token, e.g. <sks>
    class_word: str = "star"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    # --- optimisation (diffusers: AdamW, betas 0.9/0.999, weight decay 1e-2, eps 1e-8, clip 1.0)
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS[method]
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES[method]
    batch_size: int = 1  # subject photos per step (diffusers: 1); prior preservation adds as many
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    resolution: int | None = None  # None: unet.config.sample_size * vae_scale_factor
    # A folder with one mask per photo (same file stem, white = subject): the photos' loss then
    # counts the subject's pixels only, so the photos' background and framing weigh less. None: the
    # whole image (the DreamBooth paper, diffusers). [choice] Every method; class images stay whole.
    subject_masks: str | None = None
    device: str | None = None  # None: cuda when available, else cpu

    # --- DreamBooth
    train_text_encoder: bool = False  # diffusers: off; the DreamBooth paper trains it
    # Which UNet parameters train, as fnmatch patterns over their names; empty: all of them (the
    # DreamBooth paper). [choice] For studies of where a personalization lives, e.g.
    # ("*attn2.to_k.*", "*attn2.to_v.*"): Custom Diffusion's set (without its regularization).
    unet_trainable: tuple[str, ...] = ()
    # The same for the text encoder when it trains; e.g. ("embeddings.token_embedding.weight",): the
    # word embeddings only, the encoder's layers frozen. [choice]
    text_encoder_trainable: tuple[str, ...] = ()
    # Prior preservation (diffusers: off by default; TOYWORLD.md's toy recipe turns it on).
    with_prior_preservation: bool = False
    class_prompt: str | None = None  # None: "a photo of {class_word}"
    num_class_images: int = 100  # diffusers: 100
    prior_loss_weight: float = 1.0  # diffusers: 1.0
    class_data_dir: str | None = None  # None: <work_dir>/class_images (reused when already there)
    # Sampling of the class images with the base model (diffusers: the pipeline's defaults).
    class_inference_steps: int = 50
    class_guidance_scale: float = 7.5

    # --- DreamBooth-LoRA (diffusers: rank 4, alpha = rank, attention projections of the UNet)
    rank: int = 4
    lora_alpha: float | None = None  # None: equal to rank (scale 1)
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    # --- Textual Inversion
    num_vectors: int = 1  # diffusers: 1
    initializer_word: str | None = None  # None: the class word

    # --- checkpoints and output
    work_dir: str | None = None  # checkpoints and class images; None: <output>/work
    checkpoint_every: int = 500  # diffusers: checkpointing_steps 500
    checkpoints_total_limit: int = 2  # [choice] keep the newest two
    resume: bool = False  # continue from the newest checkpoint in <work_dir>/checkpoints
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # DreamBooth only: write just the components training changed (unet, text encoder if trained,
    # tokenizer, scheduler, model_index.json); the loader takes the others (vae) from the base.
    omit_unchanged: bool = False
    progress: bool = True  # tqdm progress bar

    def resolved(self) -> PersonalizeConfig:
        """A copy with every None default filled in, after checking the values make sense."""
        if self.method not in METHODS:
            raise LayoutRetouchError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if "{token}" not in self.prompt_template:
            raise LayoutRetouchError(
                f"prompt template {self.prompt_template!r} has no {{token}}; e.g. {DEFAULT_PROMPT_TEMPLATE!r}"
            )
        cfg = dataclasses.replace(self)
        cfg.max_steps = DEFAULT_MAX_STEPS[cfg.method] if cfg.max_steps is None else cfg.max_steps
        if cfg.learning_rate is None:
            cfg.learning_rate = DEFAULT_LEARNING_RATES[cfg.method]
        cfg.class_prompt = cfg.class_prompt or f"a photo of {cfg.class_word}"
        cfg.unet_trainable = tuple(cfg.unet_trainable)
        cfg.text_encoder_trainable = tuple(cfg.text_encoder_trainable)
        if (cfg.unet_trainable or cfg.text_encoder_trainable) and cfg.method != "dreambooth":
            raise LayoutRetouchError("unet_trainable and text_encoder_trainable apply to DreamBooth only "
                                     "(LoRA: lora_target_modules)")
        if cfg.text_encoder_trainable and not cfg.train_text_encoder:
            raise LayoutRetouchError("text_encoder_trainable needs train_text_encoder (--train-text-encoder)")
        cfg.lora_alpha = float(cfg.rank) if cfg.lora_alpha is None else cfg.lora_alpha
        cfg.initializer_word = cfg.initializer_word or cfg.class_word
        cfg.work_dir = cfg.work_dir or str(Path(cfg.output) / "work")
        cfg.class_data_dir = cfg.class_data_dir or str(Path(cfg.work_dir) / "class_images")
        counts = ("max_steps", "batch_size", "checkpoint_every", "rank", "num_vectors", "num_class_images")
        for name in counts:
            if getattr(cfg, name) < 1:
                raise LayoutRetouchError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.learning_rate <= 0:
            raise LayoutRetouchError(f"learning rate must be positive, got {cfg.learning_rate}")
        if cfg.omit_unchanged and cfg.method != "dreambooth":
            raise LayoutRetouchError("omit_unchanged applies to DreamBooth folders only")
        return cfg

    def instance_prompt(self) -> str:
        return self.prompt_template.format(token=self.token, class_word=self.class_word)

    def training_fingerprint(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        keys = ("method", "token", "class_word", "prompt_template", "batch_size", "learning_rate", "seed",
                "resolution", "train_text_encoder", "with_prior_preservation", "class_prompt",
                "prior_loss_weight", "rank", "lora_alpha", "num_vectors", "initializer_word")
        fingerprint = {k: getattr(self, k) for k in keys}
        for key in ("unet_trainable", "text_encoder_trainable"):  # only when set: older checkpoints resume
            if getattr(self, key):
                fingerprint[key] = list(getattr(self, key))
        if self.subject_masks:  # whether, not where: a moved mask folder still resumes
            fingerprint["subject_masks"] = True
        return fingerprint
