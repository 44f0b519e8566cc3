"""The method on Stable Diffusion XL: a tiny random SDXL with a LoRA and a two-encoder Textual Inversion."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from sdxl_world import (
    make_sdxl_base,
    make_sdxl_dreambooth,
    make_sdxl_kohya_lora,
    make_sdxl_lora,
    make_sdxl_textual_inversion,
)
from tiny_world import make_photo

from layout_retouch.architecture import LAYER_DEFAULTS, SD, SDXL, architecture_of, default_config
from layout_retouch.attention_control import AttentionController, build_plan
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError, ModelLoadError
from layout_retouch.inversion import InversionCache
from layout_retouch.layers import attention_layers, select_decoder_layers, select_map_layers
from layout_retouch.models import load_model_pair, lora_text_width
from layout_retouch.pipeline import LayoutRetouchPipeline

STEPS = 4
TINY = dict(num_inference_steps=STEPS, vanilla_steps=1, segmenter="none", ref_start_step=2)
PROMPT = "a sks dog in the snow"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    make_sdxl_base(root / "base")
    make_sdxl_lora(root / "lora")
    make_sdxl_kohya_lora(root / "kohya_lora", root / "lora")
    make_sdxl_dreambooth(root / "dreambooth")
    make_sdxl_textual_inversion(root / "sdxl_embeds.safetensors")
    make_photo(root / "reference.png", size=(64, 64))  # larger than every size the tests generate at
    return root


def load(sdxl_dir, personalized="lora", token="sks", class_word="dog", **kwargs):
    path = None if personalized is None else str(sdxl_dir / personalized)
    return LayoutRetouchPipeline.from_pretrained(str(sdxl_dir / "base"), personalized=path, token=token,
                                                 class_word=class_word, progress=False, **kwargs)


@pytest.fixture(scope="module")
def lora_pipe(sdxl_dir):
    return load(sdxl_dir)


def run(pipe, method, prompt=PROMPT, reference=None, n=2, **config):
    cfg = LayoutRetouchConfig(method=method, **{**TINY, **config})
    return pipe(prompt, reference_image=reference, config=cfg, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(7), output_type="latent")


def diffusers_sdxl(pipe, prompt, personalized: bool):
    """diffusers' own StableDiffusionXLPipeline (the loaded one, DDIM) with the LoRA on or off."""
    pipe.models.select(personalized)
    return pipe.models.pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=2,
                            generator=torch.Generator().manual_seed(7), output_type="latent").images


# --- loading
def test_sdxl_base_loads_as_sdxl_with_ddim_and_its_size(lora_pipe):
    models = lora_pipe.models
    assert models.architecture is SDXL and models.kind == "lora"
    assert type(models.scheduler).__name__ == "DDIMScheduler"
    assert len(models.text_encoders(True)) == 2 and len(models.tokenizers) == 2
    side = models.pipe.unet.config.sample_size * lora_pipe.vae_scale_factor  # SDXL: 128 x 8 = 1024
    assert lora_pipe.default_size() == (side, side)
    assert {k: getattr(lora_pipe.config, k) for k in LAYER_DEFAULTS["sdxl"]} == LAYER_DEFAULTS["sdxl"]


# --- Stage 1 against diffusers' SDXL pipeline
def test_plain_row_equals_diffusers_sdxl_pipeline(lora_pipe):
    ours = run(lora_pipe, "I").images
    assert torch.equal(ours, diffusers_sdxl(lora_pipe, PROMPT, personalized=True))


def test_all_vanilla_steps_equal_vanilla_sdxl_on_the_vanilla_prompt(lora_pipe):
    out = run(lora_pipe, "II", vanilla_steps=STEPS)
    assert out.prompts.vanilla == "a dog in the snow"
    assert torch.equal(out.images, diffusers_sdxl(lora_pipe, "a dog in the snow", personalized=False))
    assert not torch.equal(out.images, run(lora_pipe, "I").images)  # the LoRA does change the images


def test_kohya_sdxl_lora_gives_the_diffusers_one_images(sdxl_dir, lora_pipe):
    kohya = load(sdxl_dir, "kohya_lora")
    assert kohya.models.kind == "lora"
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(
        str(sdxl_dir / "kohya_lora" / "pytorch_lora_weights.safetensors")))
    assert torch.allclose(run(kohya, "I").images, run(lora_pipe, "I").images, atol=1e-5)


def test_sdxl_dreambooth_folder_is_its_unet_and_second_text_encoder(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = load(sdxl_dir, "dreambooth")
    models = pipe.models
    assert models.kind == "dreambooth" and models.personal_unet is not None
    assert models.personal_text_encoder is None and models.personal_text_encoder_2 is not None  # only the 2nd changed
    plain = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.pipe.text_encoder,
                                      text_encoder_2=models.personal_text_encoder_2, tokenizer=models.tokenizer,
                                      tokenizer_2=models.pipe.tokenizer_2, unet=models.personal_unet,
                                      scheduler=models.scheduler, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    expected = plain(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=2,
                     generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert torch.equal(run(pipe, "I").images, expected)


# --- rows III-V end to end
@pytest.mark.parametrize("personalized,token,class_word", [
    ("lora", "sks", "dog"), ("sdxl_embeds.safetensors", "<cat-toy>", "toy")])
def test_rows_run_end_to_end(sdxl_dir, tmp_path, personalized, token, class_word):
    pipe = load(sdxl_dir, personalized, token, class_word)
    prompt = f"a {token} {class_word} in the snow" if token == "sks" else f"a {token} in the snow"
    cache = str(tmp_path / "inversions")
    out = {m: run(pipe, m, prompt, sdxl_dir / "reference.png", inversion_cache_dir=cache)
           for m in ("I", "II", "III", "IV", "V")}
    for m, result in out.items():
        assert result.images.shape == (2, 4, 16, 16) and torch.isfinite(result.images).all(), m
    for a, b in [("I", "II"), ("II", "III"), ("II", "IV"), ("IV", "V")]:
        assert not torch.allclose(out[a].images, out[b].images, atol=1e-4), (a, b)
    assert set(out["V"].masks) == {"m_ca", "m_sam", "cleaned", "union", "final"}


def test_two_encoder_textual_inversion_reaches_both_encoders(sdxl_dir):
    pipe = load(sdxl_dir, "sdxl_embeds.safetensors", "<cat-toy>", "toy")
    base = load(sdxl_dir, None, None, None)
    prompt = "a <cat-toy> in the snow"
    expanded = pipe.models.expand_prompt(prompt)
    for tokenizer, encoder, plain in zip(pipe.models.tokenizers, pipe.models.text_encoders(True),
                                         base.models.text_encoders(True), strict=True):
        assert "<cat-toy>_1" in tokenizer.get_vocab()
        added = tokenizer.convert_tokens_to_ids("<cat-toy>_1")
        assert added < encoder.get_input_embeddings().weight.shape[0]
        assert encoder.get_input_embeddings().weight.shape[0] > plain.get_input_embeddings().weight.shape[0]
    assert expanded.split()[1:3] == ["<cat-toy>", "<cat-toy>_1"]


# --- the layers the method touches
def sdxl_unet_on_meta():
    """SDXL 1.0 base's UNet config (stabilityai/stable-diffusion-xl-base-1.0), without weights."""
    config = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sdxl_layer_mapping_is_pinned():
    """architecture.py's table on SDXL 1.0: the swap and blend take up_blocks.1's six self-attention layers
    (blocks 64-69 of 70), the mask the 60 cross-attention layers at 1/4; nothing sits at 1/1."""
    unet = sdxl_unet_on_meta()
    assert architecture_of(unet) is SDXL
    layers = attention_layers(unet)
    assert len({layer.index for layer in layers}) == 70
    assert not [layer for layer in layers if layer.resolution == 1.0]
    per_level = {}
    for layer in layers:
        if not layer.cross and layer.place != "mid":
            key = (layer.place, layer.resolution, layer.name.split(".attentions.")[0])
            per_level[key] = per_level.get(key, 0) + 1
    assert per_level == {("down", 0.5, "down_blocks.1"): 4, ("down", 0.25, "down_blocks.2"): 20,
                         ("up", 0.25, "up_blocks.0"): 30, ("up", 0.5, "up_blocks.1"): 6}
    config = default_config(SDXL)
    by_name = {layer.name: layer.index for layer in layers}
    swap = select_decoder_layers(layers, config.ref_min_resolution)
    assert sorted(by_name[n] for n in swap) == list(range(64, 70))
    assert all(n.startswith("up_blocks.1.") and n.endswith("attn1") for n in swap)
    maps = select_map_layers(layers, config.mask_attention_resolution)
    assert sorted(by_name[n] for n in maps) == list(range(4, 64))
    assert all(n.endswith("attn2") and not n.startswith(("down_blocks.1.", "up_blocks.1.")) for n in maps)


def test_config_defaults_per_architecture():
    for architecture in (SD, SDXL):
        config = default_config(architecture)
        assert {k: getattr(config, k) for k in LAYER_DEFAULTS[architecture.name]} == \
            LAYER_DEFAULTS[architecture.name]
    # The CLI builds its config before it loads (and knows) the model, from LayoutRetouchConfig's defaults:
    # they must be every architecture's until the CLI resolves them per architecture (SD 1.x's block indices
    # are pinned in tests/test_stage2.py).
    plain = LayoutRetouchConfig()
    for rules in LAYER_DEFAULTS.values():
        assert rules == {k: getattr(plain, k) for k in rules}
    assert default_config(SDXL, tau=0.2).tau == 0.2


def test_swap_and_blend_touch_exactly_the_documented_layers(lora_pipe, sdxl_dir, tmp_path, monkeypatch):
    unet = lora_pipe.models.pipe.unet
    layers = attention_layers(unet)
    documented = {layer.name for layer in layers
                  if layer.name.startswith("up_blocks.1.") and layer.name.endswith("attn1")}
    plan = build_plan(lora_pipe.config, unet, swap_layout=True, swap_reference=True, blend=True)
    assert plan.ref_layers == plan.blend_layers == documented
    touched = {"reference": set(), "blend": set()}
    for rule, method in (("reference", "reference_active"), ("blend", "blend_active")):
        real = getattr(AttentionController, method)

        def spy(self, layer, real=real, rule=rule):
            active = real(self, layer)
            if active:
                touched[rule].add(layer.name)
            return active
        monkeypatch.setattr(AttentionController, method, spy)
    run(lora_pipe, "V", reference=sdxl_dir / "reference.png", inversion_cache_dir=str(tmp_path))
    assert touched["reference"] == touched["blend"] == documented


# --- the reference's inversion
def test_inversion_cache_key_includes_the_added_conditioning(lora_pipe, sdxl_dir, tmp_path, monkeypatch):
    seen = []
    real = InversionCache.key

    def spy(self, *args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("added"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(InversionCache, "key", spy)
    config = LayoutRetouchConfig(method="III", **TINY, inversion_cache_dir=str(tmp_path))
    for side in (32, 48):
        lora_pipe(PROMPT, reference_image=sdxl_dir / "reference.png", config=config.replace(height=side, width=side),
                  generator=torch.Generator().manual_seed(1), output_type="latent")
    assert [s["time_ids"].tolist() for s in seen] == [[[32, 32, 0, 0, 32, 32]], [[48, 48, 0, 0, 48, 48]]]
    assert all(set(s) == {"text_embeds", "time_ids"} for s in seen)
    cache, image = InversionCache(tmp_path), lora_pipe.models.pipe.image_processor.numpy_to_pil(
        torch.rand(1, 8, 8, 3).numpy())[0]
    common = ("model", image, torch.arange(3), "", {"a": 1})
    other = {**seen[0], "text_embeds": seen[0]["text_embeds"] + 1}
    keys = {real(cache, *common), real(cache, *common, seen[0]), real(cache, *common, seen[1]),
            real(cache, *common, other)}
    assert len(keys) == 4


# --- errors: a personalization for the other architecture
def test_lora_for_the_other_architecture_is_one_clear_error(sdxl_dir, tiny_dir):
    with pytest.raises(ModelLoadError, match=r"^the LoRA .* was made for .* but the base is .*trained from$"):
        load_model_pair(str(tiny_dir / "base"), str(sdxl_dir / "lora"), token="sks")
    with pytest.raises(ModelLoadError, match=r"^the LoRA .* was made for .* but the base is .*trained from$"):
        load_model_pair(str(sdxl_dir / "base"), str(tiny_dir / "lora"), token="sks")


def test_lora_text_width_in_each_naming():
    """diffusers/PEFT, diffusers' older attention-processor names and kohya's: the key projection's input width."""
    down = torch.zeros(4, 2048)
    for key in ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
                "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight"):
        assert lora_text_width({key.replace("to_k", "to_q"): torch.zeros(4, 640), key: down}) == 2048
    assert lora_text_width({"unet.x.attn1.to_k.lora_A.weight": torch.zeros(4, 640)}) is None


def test_embedding_for_the_other_architecture_is_one_clear_error(sdxl_dir, tiny_dir):
    with pytest.raises(ModelLoadError, match="is an SDXL embedding .* but the base has one text encoder"):
        load_model_pair(str(tiny_dir / "base"), str(sdxl_dir / "sdxl_embeds.safetensors"), token="<cat-toy>")
    with pytest.raises(ModelLoadError, match="one text encoder's embedding, but an SDXL base has two"):
        load_model_pair(str(sdxl_dir / "base"), str(tiny_dir / "learned_embeds.safetensors"), token="<cat-toy>")


def test_baselines_are_refused_on_sdxl(lora_pipe):
    with pytest.raises(LayoutRetouchError, match="SD 1.x/2.x bases only"):
        run(lora_pipe, "freeu")


# --- the VAE in fp16
def test_fp16_vae_is_upcast_for_sdxl_only_and_an_fp16_fix_vae_is_not():
    from diffusers import AutoencoderKL

    from layout_retouch.vae import vae_precision

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, force_upcast=True).half()
    with vae_precision(vae, SDXL) as dtype:
        assert dtype == torch.float32 and vae.dtype == torch.float32
    assert vae.dtype == torch.float16  # cast back after the call
    with vae_precision(vae, SD) as dtype:  # SD 1.x keeps diffusers' SD behaviour
        assert dtype == vae.dtype == torch.float16
    fixed = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, force_upcast=False).half()
    with vae_precision(fixed, SDXL) as dtype:
        assert dtype == fixed.dtype == torch.float16


def test_a_given_vae_replaces_the_base_vae(sdxl_dir, tmp_path):
    from layout_retouch.tiny_sdxl import tiny_sdxl_components

    vae = tiny_sdxl_components(seed=9)["vae"]
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "vae_fix")
    pipe = load(sdxl_dir, None, None, None, vae=str(tmp_path / "vae_fix"))
    assert pipe.models.vae.config.force_upcast is False and pipe.models.sources["vae"] == str(tmp_path / "vae_fix")
    loaded = pipe.models.vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vae.state_dict().items())
    with pytest.raises(ModelLoadError, match="holds no VAE"):
        load(sdxl_dir, None, None, None, vae=str(tmp_path))


def test_generate_cli_on_sdxl_with_a_lora(sdxl_dir, tmp_path):
    from layout_retouch.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--base", str(sdxl_dir / "base"), "--personalized", str(sdxl_dir / "lora"),
                 "--token", "sks", "--class-word", "dog", "--prompt", PROMPT, "--out", str(out),
                 "--reference", str(sdxl_dir / "reference.png"), "--steps", "3", "--ref-start-step", "1",
                 "--segmenter", "none", "--inversion-cache-dir", str(tmp_path / "inv"), "--quiet"])
    assert code == 0
    (image,) = out.rglob("*.png")
    assert image.with_suffix(".json").is_file()


def test_single_file_sdxl_base_loads_as_the_folder_does(sdxl_dir, tmp_path):
    from layout_retouch.single_file_sdxl import export_sdxl_single_file
    from layout_retouch.tiny_sdxl import tiny_sdxl_pipeline

    file = export_sdxl_single_file(tiny_sdxl_pipeline(seed=0), tmp_path / "sdxl.safetensors")
    from_file = LayoutRetouchPipeline.from_pretrained(str(file), base_config=str(sdxl_dir / "base"), progress=False)
    from_folder = load(sdxl_dir, None, None, None)
    assert from_file.models.architecture is SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = getattr(from_file.models.pipe, name).state_dict()
        theirs = getattr(from_folder.models.pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # the same weights at other memory alignments (safetensors' mmap), where BLAS rounds differently
    assert torch.allclose(run(from_file, "I", "a dog").images, run(from_folder, "I", "a dog").images,
                          rtol=1e-5, atol=1e-4)


def test_model_offload_moves_both_text_encoders_and_gives_the_same_images(sdxl_dir, tmp_path):
    def full(pipe):
        return run(pipe, "V", reference=sdxl_dir / "reference.png", inversion_cache_dir=str(tmp_path)).images

    expected = full(load(sdxl_dir))
    offloaded = load(sdxl_dir)
    offloaded.enable_model_cpu_offload("cpu")
    assert hasattr(offloaded.models.pipe.text_encoder_2, "_hf_hook")
    # float rounding only: offloading changed latents of magnitude up to 16 by 2.3e-5 on an AMD EPYC
    assert torch.allclose(full(offloaded), expected, atol=1e-4)


def test_a_refiner_or_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from layout_retouch.tiny_sdxl import tiny_sdxl_components

    parts = {**tiny_sdxl_components(), "text_encoder": None, "tokenizer": None}
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(tmp_path / "refiner")
    with pytest.raises(ModelLoadError, match="one text encoder of SDXL's two .an SDXL refiner"):
        load_model_pair(str(tmp_path / "refiner"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load the single-file checkpoint"):
        load_model_pair(str(tmp_path / "broken.safetensors"))
