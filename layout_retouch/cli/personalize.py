"""`layout-retouch personalize`: DreamBooth, DreamBooth-LoRA or Textual Inversion on subject photos."""

from __future__ import annotations

import argparse

from layout_retouch.personalize.config import (
    DEFAULT_LEARNING_RATES,
    DEFAULT_MAX_STEPS,
    DEFAULT_PROMPT_TEMPLATE,
    METHODS,
    PersonalizeConfig,
)

EXAMPLE = """examples:
  layout-retouch personalize --method dreambooth --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --photos photos/dog --token sks --class-word dog --with-prior-preservation --output out/dog_db
  layout-retouch personalize --method textual_inversion --base toyworld/models/vanilla --photos refs \\
      --token '<sks>' --num-vectors 2 --output out/sks_ti
"""


def register(subparsers) -> None:
    defaults = PersonalizeConfig(method="dreambooth", base="", photos="", output="")
    p = subparsers.add_parser(
        "personalize", help="fine-tune a Stable Diffusion pipeline on photos of a subject",
        description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--base", required=True, help="diffusers StableDiffusionPipeline folder or hub id")
    p.add_argument("--photos", required=True, help="folder of subject photos (every image in it)")
    p.add_argument("--output", required=True, help="folder to write the personalized model to")
    p.add_argument("--subject-masks", metavar="DIR",
                   help="folder with a mask per photo (same file name stem, white = subject): the loss then "
                        "counts only the subject, not the photos' background (default: the whole image)")
    p.add_argument("--token", default=defaults.token, help="subject token: sks (DreamBooth/LoRA), <sks> (TI)")
    p.add_argument("--class-word", default=defaults.class_word)
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                   help="training prompt; {token} and {class_word} are filled in")
    steps = ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_STEPS.items())
    rates = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
    p.add_argument("--max-steps", type=int, help=f"default per method: {steps}")
    p.add_argument("--learning-rate", "--lr", type=float, help=f"default per method: {rates}")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--resolution", type=int, help="default: the UNet's sample size x the VAE's down-scaling")
    p.add_argument("--device", help="default: cuda when available, else cpu")

    db = p.add_argument_group("DreamBooth")
    db.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                    default=defaults.train_text_encoder)
    db.add_argument("--unet-trainable", nargs="+", metavar="PATTERN", default=list(defaults.unet_trainable),
                    help="fine-tune only the UNet parameters whose names match these fnmatch patterns "
                         "(default: all), e.g. '*attn2.to_k.*' '*attn2.to_v.*' (Custom Diffusion's set)")
    db.add_argument("--text-encoder-trainable", nargs="+", metavar="PATTERN",
                    default=list(defaults.text_encoder_trainable),
                    help="with --train-text-encoder: only these text-encoder parameters (default: all), e.g. "
                         "'embeddings.token_embedding.weight'")
    db.add_argument("--with-prior-preservation", action=argparse.BooleanOptionalAction,
                    default=defaults.with_prior_preservation,
                    help="also train on class images the base model generates (default off, as in diffusers)")
    db.add_argument("--class-prompt", help="default: 'a photo of <class word>'")
    db.add_argument("--num-class-images", type=int, default=defaults.num_class_images)
    db.add_argument("--prior-loss-weight", type=float, default=defaults.prior_loss_weight)
    db.add_argument("--class-data-dir",
                    help="where class images are kept and reused (default <work-dir>/class_images)")
    db.add_argument("--class-inference-steps", type=int, default=defaults.class_inference_steps)
    db.add_argument("--class-guidance-scale", type=float, default=defaults.class_guidance_scale)
    db.add_argument("--omit-unchanged", action="store_true",
                    help="write only the trained components; the loader takes the vae (and an untrained "
                         "text encoder) from the base")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=defaults.rank)
    lora.add_argument("--lora-alpha", type=float, help="default: the rank (adapter scale 1)")

    ti = p.add_argument_group("Textual Inversion")
    ti.add_argument("--num-vectors", type=int, default=defaults.num_vectors)
    ti.add_argument("--initializer-word", help="default: the class word")

    ck = p.add_argument_group("checkpoints and output")
    ck.add_argument("--work-dir", help="checkpoints and class images (default <output>/work)")
    ck.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    ck.add_argument("--checkpoints-total-limit", type=int, default=defaults.checkpoints_total_limit)
    ck.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --work-dir")
    ck.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default=defaults.save_dtype)
    ck.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> PersonalizeConfig:
    fields = PersonalizeConfig.__dataclass_fields__
    return PersonalizeConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> int:
    from layout_retouch.personalize.api import personalize

    result = personalize(config_from_args(args))
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print(f"personalize: {result.config.method} {result.steps} steps{resumed} in {result.train_seconds:.1f} s"
          f"{loss} -> {result.output}")
    return 0
