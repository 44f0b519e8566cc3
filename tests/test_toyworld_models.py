"""The shipped vanilla toy model is a standard diffusers SD folder: it loads and generates."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from layout_retouch.toyworld.scene import PERSONAL_TOKEN

VANILLA = Path(__file__).resolve().parents[1] / "layout_retouch" / "toyworld" / "models" / "vanilla"
MAX_VANILLA_MB = 20


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(VANILLA)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_standard_sd_pipeline():
    index = json.loads((VANILLA / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (VANILLA / part).is_dir(), part
    sched = json.loads((VANILLA / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert (sched["beta_start"], sched["beta_end"], sched["clip_sample"]) == (0.00085, 0.012, False)
    assert not list(VANILLA.rglob("*.bin")) and not list(VANILLA.rglob("*.pt"))  # safetensors only
    size_mb = sum(f.stat().st_size for f in VANILLA.rglob("*") if f.is_file()) / 2**20
    assert size_mb <= MAX_VANILLA_MB


def test_generates_64px_images_in_a_few_steps(pipe):
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    out = pipe(["a photo of a red ball on the beach", "a photo of a blue box at night"],
               num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    images = [np.asarray(im) for im in out.images]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert not np.array_equal(images[0], images[1]) and images[0].std() > 5


def test_personal_token_is_one_vocabulary_word_and_textual_inversion_loads(pipe, tmp_path):
    assert len(pipe.tokenizer.tokenize(PERSONAL_TOKEN)) == 1
    dim = pipe.text_encoder.config.hidden_size
    save_file({"<toy-concept>": torch.randn(1, dim)}, str(tmp_path / "learned_embeds.safetensors"))
    before = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<toy-concept>")
    try:
        assert len(pipe.tokenizer) == before + 1
        assert "<toy-concept>" in pipe.tokenizer.tokenize("a <toy-concept> star")
    finally:
        pipe.unload_textual_inversion("<toy-concept>")


def test_grown_unet_computes_what_its_checkpoint_did(tmp_path):
    """train_vanilla --grow-from: the 16x16 decoder attention starts as a no-op, optimizer moments carry over."""
    from layout_retouch.toyworld.checkpoint import save_checkpoint
    from layout_retouch.toyworld.components import build_text_encoder, build_unet
    from layout_retouch.toyworld.tokenizer import build_tokenizer
    from layout_retouch.toyworld.train_vanilla import grow

    torch.manual_seed(0)
    tokenizer = build_tokenizer()

    def modules(full_res: bool) -> dict:
        return {"unet": build_unet(full_res), "text_encoder": build_text_encoder(tokenizer),
                "ema_unet": build_unet(full_res), "ema_text": build_text_encoder(tokenizer)}

    def optimizer(mods):
        return torch.optim.AdamW([*mods["unet"].parameters(), *mods["text_encoder"].parameters()])

    old = modules(False)
    old_opt = optimizer(old)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([900, 30]), torch.randn(2, 8, 128)
    old["unet"](x, t, text).sample.square().mean().backward()
    old_opt.step()  # some moments to carry over
    save_checkpoint(tmp_path / "old.safetensors", old, old_opt, step=123)

    new = modules(True)
    new_opt = optimizer(new)
    assert grow(tmp_path / "old.safetensors", new, new_opt) == 123
    assert any("up_blocks.2.attentions" in name for name, _ in new["unet"].named_parameters())
    with torch.no_grad():
        for name in ("unet", "ema_unet"):
            assert torch.allclose(new[name](x, t, text).sample, old[name](x, t, text).sample, atol=1e-6)
    moved = new["unet"].conv_in.weight
    assert torch.equal(new_opt.state[moved]["exp_avg"], old_opt.state[old["unet"].conv_in.weight]["exp_avg"])


def test_shipped_unet_has_the_recipe_architecture():
    from layout_retouch.toyworld.components import SHIPPED_UNET_ARCH, UNET_ARCHITECTURES

    shipped = json.loads((VANILLA / "unet" / "config.json").read_text())
    recipe = UNET_ARCHITECTURES[SHIPPED_UNET_ARCH]().config
    for key in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "sample_size"):
        assert list(np.atleast_1d(shipped[key])) == list(np.atleast_1d(recipe[key])), key


def test_attention_contribution_reads_zero_for_a_block_that_adds_nothing(pipe):
    from layout_retouch.toyworld.attention_contribution import transformer_contributions

    block = pipe.unet.up_blocks[1].attentions[0]
    saved = {k: v.clone() for k, v in block.proj_out.state_dict().items()}
    try:
        for p in block.proj_out.parameters():
            p.data.zero_()
        ratios = transformer_contributions(pipe, "a photo of a red ball on the beach", steps=2, seeds=1)
    finally:
        block.proj_out.load_state_dict(saved)
    assert ratios["up_blocks.1.attentions.0"] < 1e-6
    assert ratios["up_blocks.1.attentions.1"] > 0.05
    assert len(ratios) == sum(len(getattr(b, "attentions", [])) for b in
                              [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks])


def test_export_and_continue_round_trip_the_ema_unet(tmp_path):
    """train_vanilla --export writes a live checkpoint's EMA UNet as a pipeline; --init-from starts from it."""
    import shutil

    from layout_retouch.toyworld.checkpoint import save_checkpoint
    from layout_retouch.toyworld.components import build_unet_v2
    from layout_retouch.toyworld.train_vanilla import continue_from, export_checkpoint

    torch.manual_seed(0)
    trained, ema = build_unet_v2(), build_unet_v2()
    (tmp_path / "work").mkdir()
    save_checkpoint(tmp_path / "work" / "unet_checkpoint.safetensors", {"unet": trained, "ema_unet": ema},
                    torch.optim.AdamW(trained.parameters()), step=321)
    out = tmp_path / "vanilla"
    shutil.copytree(VANILLA / "vae", out / "vae")
    assert export_checkpoint(tmp_path / "work", out, "v2", text_encoder_from=VANILLA) == 321
    fresh = {"unet": build_unet_v2(), "ema_unet": build_unet_v2()}
    assert continue_from(out, fresh) == 321
    for name in ("unet", "ema_unet"):
        for (key, value), expected in zip(fresh[name].state_dict().items(), ema.state_dict().values(), strict=True):
            assert torch.allclose(value, expected.half().float()), key  # the EMA weights, through fp16


@pytest.mark.parametrize("arch", ["v2", "v4"])
def test_each_unet_layout_makes_64px_images_with_its_vae(arch):
    """Every candidate layout plugs into a standard SD pipeline with the VAE factor it is meant for."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from layout_retouch.toyworld.components import UNET_ARCHITECTURES, UNET_VAE_FACTOR, build_vae, sample_scheduler

    torch.manual_seed(0)
    vae, unet = build_vae(UNET_VAE_FACTOR[arch]), UNET_ARCHITECTURES[arch]()
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=CLIPTextModel.from_pretrained(VANILLA / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(VANILLA / "tokenizer"), scheduler=sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert unet.config.sample_size * pipe.vae_scale_factor == 64
    image = pipe("a photo of a red star", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_unet_stage_refuses_a_vae_of_the_wrong_factor(tmp_path):
    import shutil

    from layout_retouch.toyworld.train_vanilla import UnetRecipe, train_unet

    shutil.copytree(VANILLA / "vae", tmp_path / "vae")  # factor 4: 16x16 latents
    with pytest.raises(ValueError, match="factor 2"):
        train_unet(tmp_path, tmp_path / "work", 0, UnetRecipe(arch="v4", steps=1))


def test_muted_cross_attention_stays_text_free_under_training():
    from layout_retouch.toyworld.components import build_unet_v2, mute_cross_attention

    torch.manual_seed(0)
    unet = build_unet_v2()
    muted = mute_cross_attention(unet, (16, 8))
    assert muted and all(name.endswith("attn2") for name in muted)
    assert len(muted) == 6  # v2: one encoder and two decoder transformer blocks at each of 16x16 and 8x8
    modules = dict(unet.named_modules())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=1e-2)
    latents = torch.randn(2, 4, 16, 16)
    for _ in range(2):
        text = torch.randn(2, 8, unet.config.cross_attention_dim)
        loss = unet(latents, torch.tensor([500, 20]), text).sample.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    outputs = {}
    for name in muted:
        modules[name].register_forward_hook(lambda m, args, out, name=name: outputs.setdefault(name, out))
    with torch.no_grad():  # one latent, two texts: a muted layer gives both the same
        unet(latents[:1].repeat(2, 1, 1, 1), torch.tensor([500, 500]), torch.randn(2, 8, 128))
    for name in muted:
        assert not modules[name].to_v.weight.any() and not modules[name].to_out[0].weight.any(), name
        assert torch.equal(outputs[name][0], outputs[name][1]), name
    kept = [name for name in modules if name.endswith("attn2") and name not in muted]
    assert kept and all(modules[name].to_v.weight.any() for name in kept)
