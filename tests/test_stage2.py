"""Stage 2: inversion, the attention control, the adaptive mask and the ablation rows, on tiny models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from PIL import Image

from layout_retouch.attention_control import (
    LAYOUT,
    REFERENCE,
    TARGET,
    AttentionController,
    ControlPlan,
    LayoutRetouchAttnProcessor,
    PathRows,
    build_plan,
)
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.inversion import (
    DDIMInversion,
    InversionCache,
    InversionTrajectory,
    ddim_invert,
    load_reference_image,
)
from layout_retouch.layers import LayerInfo, attention_layers, select_decoder_layers, select_map_layers
from layout_retouch.masks import adaptive_mask, clean_components, soften
from layout_retouch.pipeline import LayoutRetouchPipeline
from layout_retouch.sampling import PathInput, attention_control, guided_eps
from layout_retouch.stage1_layout import step_blended_denoise
from layout_retouch.stage2_retouch import RetouchConditioning, retouch

STEPS = 6
TINY = dict(num_inference_steps=STEPS, mask_attention_resolution=0.5, segmenter="none", ref_start_step=2)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"),
                                                 token="sks", class_word="dog", progress=False)


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "inversions")


def setup_run(pipe, prompt="a sks dog in the snow", n=2, steps=STEPS):
    cond = pipe.encode_prompts(pipe.derive_prompts(prompt))
    pipe.models.scheduler.set_timesteps(steps)
    timesteps = pipe.models.scheduler.timesteps
    latents = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    return cond, timesteps, latents


# --- inversion
def _reconstruction_error(unet, scheduler, z0, embedding, steps):
    scheduler.set_timesteps(steps)
    traj = ddim_invert(unet, scheduler, z0, scheduler.timesteps, embedding, progress=False)
    assert len(traj.latents) == steps + 1 and torch.equal(traj.latents[-1], z0)
    x = traj.latents[0]
    with torch.no_grad():
        for t in scheduler.timesteps:  # plain DDIM from the inverted noise, same prompt, no guidance
            x = scheduler.step(unet(x, t, encoder_hidden_states=embedding).sample, t, x).prev_sample
    return float((x - z0).norm() / z0.norm())


def test_inversion_then_reconstruction_gives_back_the_latent():
    from layout_retouch.tiny_models import tiny_components

    parts = tiny_components(seed=0)
    unet, scheduler = parts["unet"], parts["scheduler"]
    z0, embedding = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():  # a model whose noise prediction varies smoothly, like a trained one
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    coarse, fine = (_reconstruction_error(unet, scheduler, z0, embedding, s) for s in (10, 50))
    assert fine < 0.05 and fine < coarse  # DDIM inversion's error shrinks with the step size
    with torch.no_grad():  # with a constant prediction the inversion is exact: the schedule math is right
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    assert _reconstruction_error(unet, scheduler, z0, embedding, 10) < 1e-5


def test_reference_is_checked_and_cropped(tmp_path):
    wide = Image.new("RGB", (80, 40), "red")
    assert load_reference_image(wide, (32, 32)).size == (32, 32)
    from layout_retouch.errors import ImageInputError
    with pytest.raises(ImageInputError, match="does not exist"):
        load_reference_image(tmp_path / "none.png", (32, 32))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageInputError, match="cannot be read"):
        load_reference_image(tmp_path / "bad.png", (32, 32))
    with pytest.raises(ImageInputError, match="empty"):
        load_reference_image(Image.new("RGB", (0, 0)), (32, 32))


def test_inversion_cache_hits_and_invalidates(pipe, tiny_dir, cache_dir, monkeypatch):
    calls = []
    real = DDIMInversion.run
    monkeypatch.setattr(DDIMInversion, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = load_reference_image(tiny_dir / "reference.png", (32, 32))
    config = LayoutRetouchConfig(inversion_cache_dir=cache_dir)

    def invert(img=image, steps=5):
        pipe.models.scheduler.set_timesteps(steps)
        return pipe.invert_reference(img, pipe.models.scheduler.timesteps, config)

    first = invert()
    again = invert()
    assert len(calls) == 1 and all(torch.allclose(a, b) for a, b in zip(first.latents, again.latents, strict=True))
    invert(steps=6)  # other schedule
    invert(img=image.transpose(Image.FLIP_LEFT_RIGHT))  # other image content
    invert(img=load_reference_image(tiny_dir / "reference.png", (16, 16)))  # other size
    assert len(calls) == 4
    other = LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), progress=False)  # other model
    pipe.models.scheduler.set_timesteps(5)
    other.invert_reference(image, pipe.models.scheduler.timesteps, config)
    assert len(calls) == 5
    assert len(list(InversionCache(cache_dir).folder.glob("*.safetensors"))) == 5


# --- invariants of the control
def test_control_off_target_with_layout_prompt_reproduces_layout(pipe):
    cond, timesteps, latents = setup_run(pipe)
    config = LayoutRetouchConfig(method="IV", vanilla_steps=2, target_prompt="layout", **TINY)
    layout = step_blended_denoise(pipe.models, latents, timesteps, 2, cond.vanilla, cond.personalized, 7.5,
                                  progress=False)
    reference = InversionTrajectory([x[:1] for x in layout.latents], timesteps)
    controller = AttentionController(ControlPlan(), latent_size=(16, 16))  # control off
    with attention_control(pipe.models.unets(), controller):
        result = retouch(pipe.models, config, controller, cond, latents.clone(), timesteps, layout, reference,
                         progress=False)
    assert torch.allclose(result, layout.latents[-1], rtol=1e-4, atol=1e-4)


def test_reference_equal_to_target_changes_nothing(pipe):
    cond, timesteps, latents = setup_run(pipe, n=1)
    own = step_blended_denoise(pipe.models, latents, timesteps, 0, cond.neutral, cond.neutral, 7.5, progress=False)
    same = RetouchConditioning(vanilla=cond.neutral, personalized=cond.neutral, neutral=cond.neutral)
    config = LayoutRetouchConfig(method="III", vanilla_steps=0, ref_subject_only=False, **{**TINY,
                                                                                            "ref_start_step": 0})
    plan = build_plan(config, pipe.models.pipe.unet, swap_layout=False, swap_reference=True, blend=False)
    assert plan.ref_layers
    controller = AttentionController(plan, latent_size=(16, 16))
    with attention_control(pipe.models.unets(), controller):
        result = retouch(pipe.models, config, controller, same, latents.clone(), timesteps, None,
                         InversionTrajectory(own.latents, timesteps), progress=False)
    assert torch.allclose(result, own.latents[-1], rtol=1e-4, atol=1e-4)


def _target_noise(pipe, controller, paths, t):
    captured = {}
    unet, _ = pipe.models.select(True)

    def keep(module, args, out):
        captured["out"] = out.sample  # returns None: the output itself is left alone

    handle = unet.register_forward_hook(keep)
    try:
        guided_eps(pipe.models, paths, t, 7.5, controller)
    finally:
        handle.remove()
    return captured["out"][controller.last_paths[TARGET].rows].chunk(2)


@pytest.mark.parametrize("step", [0, 3])  # early map swap; reference swap with mask blending
def test_unconditional_halves_only_controlled_by_unconditional_halves(pipe, step):
    cond, timesteps, latents = setup_run(pipe, n=1)
    config = LayoutRetouchConfig(method="V", vanilla_steps=0, ref_subject_only=False, **TINY)
    plan = build_plan(config, pipe.models.pipe.unet, swap_layout=True, swap_reference=True, blend=True)

    def run(source_cond, source_uncond):
        from layout_retouch.sampling import Conditioning
        controller = AttentionController(plan, latent_size=(16, 16))
        controller.blend_mask_fn = lambda c: torch.linspace(0, 1, 256).view(1, 16, 16)
        controller.begin_step(step)
        other = Conditioning(source_cond, source_uncond, cond.neutral.tokens)
        paths = [PathInput(REFERENCE, latents[:1] * 0.5, True, other), PathInput(LAYOUT, latents * 0.8, True, other),
                 PathInput(TARGET, latents, True, cond.neutral, wants_eps=True)]
        with attention_control(pipe.models.unets(), controller):
            return _target_noise(pipe, controller, paths, timesteps[step])

    base_u, base_c = run(cond.personalized.cond, cond.personalized.uncond)
    new_u, new_c = run(cond.vanilla.cond, cond.personalized.uncond)  # sources' conditional halves change
    assert torch.allclose(base_u, new_u, atol=1e-6)
    assert not torch.allclose(base_c, new_c, atol=1e-4)
    other_u, _ = run(cond.personalized.cond, cond.vanilla.cond)  # sources' unconditional halves change
    assert not torch.allclose(base_u, other_u, atol=1e-4)


def test_reference_background_keys_get_zero_weight():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    layer = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 0, "up", 1.0, False)
    plan = ControlPlan(ref_start=0, ref_layers={layer.name}, ref_subject_only=True, ref_mask_threshold=0.5)
    controller = AttentionController(plan, latent_size=(4, 4))
    subject = torch.zeros(1, 4, 4)
    subject[:, :, :2] = 1.0  # the reference's subject: the left half
    controller.previous_maps[REFERENCE] = subject
    controller.begin_call([PathRows(REFERENCE, 0, 2), PathRows(TARGET, 2, 6)])  # halves side by side
    processor = LayoutRetouchAttnProcessor(controller, layer)
    hidden = torch.randn(6, 16, 8)
    out = processor(attn, hidden)
    background = torch.tensor([[False, False, True, True]] * 4).flatten()
    changed = hidden.clone()
    changed[:2, background] += 5 * torch.randn(2, int(background.sum()), 8)
    assert torch.allclose(processor(attn, changed)[2:], out[2:], atol=1e-6)  # target untouched
    changed = hidden.clone()
    changed[:2, ~background] += 5 * torch.randn(2, int((~background).sum()), 8)
    assert not torch.allclose(processor(attn, changed)[2:], out[2:], atol=1e-3)


@pytest.mark.parametrize("m", [0.0, 0.3, 1.0])
def test_blend_mixes_layer_outputs_after_their_projections(m):
    """The paper blends the self-attention layers' outputs: a layout that ran through another model (a vanilla
    step) lends its own projected output, not its attention for the target's projection (issue 14)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    vanilla, personal = Attention(query_dim=8, heads=2, dim_head=4), Attention(query_dim=8, heads=2, dim_head=4)
    personal.load_state_dict(vanilla.state_dict())
    with torch.no_grad():  # only the output projection differs
        personal.to_out[0].weight.add_(0.5 * torch.randn_like(personal.to_out[0].weight))
    layer = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", 0, "up", 1.0, False)
    controller = AttentionController(ControlPlan(mask_start=0, blend_layers={layer.name}), latent_size=(4, 4))
    controller.blend_mask_fn = lambda c: torch.full((1, 4, 4), m)
    controller.begin_step(0)
    processor = LayoutRetouchAttnProcessor(controller, layer)
    layout_hidden, target_hidden = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    controller.begin_call([PathRows(LAYOUT, 0, 2)])  # the layout's call, through the vanilla layer
    layout_out = processor(vanilla, layout_hidden)
    controller.begin_call([PathRows(TARGET, 0, 2)])  # the target's, through the personalized one
    blended = processor(personal, target_hidden)
    own = AttnProcessor2_0()(personal, target_hidden)
    assert torch.allclose(blended, m * own + (1 - m) * layout_out, atol=1e-6)


def test_processor_without_control_matches_diffusers_default():
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    cross = Attention(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6)
    hidden, text = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    layer = LayerInfo("x", 0, "up", 1.0, True)
    ours = LayoutRetouchAttnProcessor(AttentionController(ControlPlan(), latent_size=(4, 4)), layer)
    assert torch.equal(ours(cross, hidden, text), AttnProcessor2_0()(cross, hidden, text))
    self_attn = Attention(query_dim=8, heads=2, dim_head=4)
    layer = LayerInfo("x", 0, "up", 1.0, False)
    ours = LayoutRetouchAttnProcessor(AttentionController(ControlPlan(), latent_size=(4, 4)), layer)
    assert torch.equal(ours(self_attn, hidden), AttnProcessor2_0()(self_attn, hidden))


# --- layers
def test_layer_rule_gives_sd1_block_indices():
    config = dict(sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = attention_layers(unet)
    assert sorted({layer.index for layer in layers}) == list(range(16))
    by_name = {layer.name: layer.index for layer in layers}
    ref = select_decoder_layers(layers, LayoutRetouchConfig().ref_min_resolution)
    assert sorted(by_name[n] for n in ref) == [10, 11, 12, 13, 14, 15]  # the paper's l >= 10
    maps = select_map_layers(layers, LayoutRetouchConfig().mask_attention_resolution)
    assert sorted(by_name[n] for n in maps) == [4, 5, 7, 8, 9]  # the 16x16 layers at 512 px
    assert select_decoder_layers(layers, 0.5, indices=(13, 14)) == {
        n for n, i in by_name.items() if i in (13, 14) and n.endswith("attn1")}
    with pytest.raises(ValueError, match="no cross-attention at 0.0625"):
        select_map_layers(layers, 1 / 16)


# --- mask math on hand-made arrays
def test_soften_is_half_to_one_inside_zero_outside():
    union = np.zeros((20, 20), bool)
    union[5:15, 4:16] = True
    soft = soften(union)
    assert soft[~union].max() == 0
    assert soft[union].min() == pytest.approx(0.5) and soft[union].max() == pytest.approx(1.0)
    assert soft[10, 10] > soft[5, 10]  # deeper inside is softer-to-harder
    assert soften(np.zeros((4, 4), bool)).max() == 0


def test_clean_components_drops_small_and_stray():
    ca = np.zeros((20, 20), bool)
    ca[2:8, 2:8] = True  # overlaps SAM: kept
    ca[12:18, 12:18] = True  # large, but misses SAM: dropped
    ca[0, 19] = True  # tiny: dropped
    sam = np.zeros((20, 20), bool)
    sam[5:10, 5:10] = True
    cleaned = clean_components(ca, sam, min_area=0.01)
    assert cleaned[2:8, 2:8].all() and not cleaned[12:18, 12:18].any() and not cleaned[0, 19]
    no_sam = clean_components(ca, np.zeros_like(sam), min_area=0.01)  # area rule only
    assert no_sam[12:18, 12:18].all() and not no_sam[0, 19]


def test_adaptive_mask_confident_region_is_one():
    ca = np.zeros((20, 20), bool)
    ca[6:10, 6:10] = True
    sam = np.zeros((20, 20), bool)
    sam[4:14, 4:14] = True
    mask = adaptive_mask(ca, sam, 0.01)
    assert (mask.final[ca] == 1).all()
    assert mask.union.sum() == sam.sum() and (mask.final[~mask.union] == 0).all()
    assert 0.5 <= mask.final[4, 4] < 1
    assert (adaptive_mask(np.zeros_like(ca), np.zeros_like(sam), 0.01).final == 1).all()  # nothing found


# --- segmenters
def test_sam_wrapper_on_tiny_random_sam(tmp_path):
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from layout_retouch.segmenters import SamSegmenter, load_segmenter

    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           output_channels=16, image_size=64, patch_size=16, window_size=2,
                           global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(tmp_path / "sam")
    processor = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64},
                                                                  pad_size={"height": 64, "width": 64}))
    processor.save_pretrained(tmp_path / "sam")
    segmenter = load_segmenter("sam", str(tmp_path / "sam"))
    assert isinstance(segmenter, SamSegmenter)
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    mask = segmenter(image, (5, 5, 30, 30), (15, 15))
    assert mask.shape == (48, 40) and mask.dtype == bool
    from layout_retouch.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="cannot load Segment Anything from.*--segmenter none"):
        load_segmenter("sam", str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="unknown segmenter"):
        load_segmenter("nope")


# --- ablation rows end to end
def run_method(pipe, tiny_dir, cache_dir, method, **extra):
    config = LayoutRetouchConfig(method=method, inversion_cache_dir=cache_dir, **{**TINY, **extra})
    return pipe("a sks dog in the snow", reference_image=tiny_dir / "reference.png", config=config,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), output_type="latent")


def test_ablation_rows_run_and_differ_where_they_should(pipe, tiny_dir, cache_dir):
    out = {m: run_method(pipe, tiny_dir, cache_dir, m) for m in ("I", "II", "III", "IV", "V")}
    for m, result in out.items():
        assert result.images.shape == (2, 4, 16, 16), m
    pairs = [("I", "II"), ("II", "III"), ("II", "IV"), ("III", "IV"), ("IV", "V")]
    for a, b in pairs:
        assert not torch.allclose(out[a].images, out[b].images, atol=1e-4), (a, b)
    assert out["III"].layout_images is None and len(out["V"].layout_images) == 2
    assert set(out["V"].masks) == {"m_ca", "m_sam", "cleaned", "union", "final"}
    # V with blending that never starts is IV; IV and V share their layout (Stage 1).
    late = run_method(pipe, tiny_dir, cache_dir, "V", mask_start_step=STEPS)
    assert torch.allclose(late.images, out["IV"].images, rtol=1e-4, atol=1e-4)
    # Stage 2's first steps ride in Stage 1's UNet calls (`pipeline_stages`); the rows a call carries can change
    # the others' float rounding (seen: 9e-6 on latents of size ~10), so equal to rounding with them and bit for
    # bit without them.
    torch.testing.assert_close(out["IV"].trajectory.latents[-1], out["II"].trajectory.latents[-1],
                               rtol=1e-5, atol=1e-5)
    alone = run_method(pipe, tiny_dir, cache_dir, "IV", pipeline_stages=False)
    assert torch.equal(alone.trajectory.latents[-1], out["II"].trajectory.latents[-1])


def test_a_target_started_from_the_layout_takes_its_own_steps_from_t_l_on(pipe, tiny_dir, cache_dir):
    """`target_start="layout"`: the target begins at the layout's latent after the vanilla steps. With the layout's
    own prompt and no swap left (S_ref at the end) it then is the layout; at T_l = T it is the layout's image without a
    step of its own; in calls of its own or riding in Stage 1's, the same to float rounding; and it is not the target
    that starts from noise."""
    layout_like = run_method(pipe, tiny_dir, cache_dir, "IV", vanilla_steps=3, target_start="layout",
                             target_prompt="layout", ref_start_step=STEPS)
    torch.testing.assert_close(layout_like.images, layout_like.trajectory.latents[-1], rtol=1e-5, atol=1e-5)
    whole = run_method(pipe, tiny_dir, cache_dir, "V", vanilla_steps=STEPS, target_start="layout")
    assert torch.equal(whole.images, whole.trajectory.latents[-1])
    started = run_method(pipe, tiny_dir, cache_dir, "V", vanilla_steps=3, target_start="layout")
    alone = run_method(pipe, tiny_dir, cache_dir, "V", vanilla_steps=3, target_start="layout", pipeline_stages=False)
    torch.testing.assert_close(started.images, alone.images, rtol=1e-5, atol=1e-5)
    from_noise = run_method(pipe, tiny_dir, cache_dir, "V", vanilla_steps=3)
    assert not torch.allclose(started.images, from_noise.images, atol=1e-3)
    with pytest.raises(LayoutRetouchError, match="target_start"):
        LayoutRetouchConfig(target_start="reference")
    # the layout lends nothing for the steps before the target's first: its recorder keeps nothing of them
    config = LayoutRetouchConfig(method="V", vanilla_steps=3, target_start="layout", mask_start_step=1, **TINY)
    plan = build_plan(config, pipe.models.pipe.unet, swap_layout=True, swap_reference=True, blend=True)
    layer = next(iter(plan.blend_layers))
    assert [plan.blend_at(k, layer) for k in range(STEPS)] == [False] * 3 + [True] * (STEPS - 3)
    assert not any(plan.early_at(k) for k in range(STEPS))  # S_ref 2 comes before the target's first step


def test_only_cross_attention_maps_are_materialized(pipe, tiny_dir, cache_dir, monkeypatch):
    shapes = []
    real = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    monkeypatch.setattr(torch, "softmax", lambda x, *a, **k: spy(x, *a, **k))
    monkeypatch.setattr(F, "softmax", lambda x, *a, **k: spy(x, *a, **k))
    monkeypatch.setattr(Attention, "get_attention_scores", lambda *a, **k: pytest.fail("probabilities"))
    run_method(pipe, tiny_dir, cache_dir, "V")
    text_length = pipe.models.tokenizer.model_max_length
    assert shapes, "the mask's cross-attention maps must be computed"
    assert {s[-1] for s in shapes} == {text_length}  # keys are text tokens: cross-attention only
    assert {s[-2] for s in shapes} == {8 * 8}  # only at the maps' resolution (1/2 of 16x16 latents)


def test_generate_cli_full_method_writes_intermediates(tiny_dir, tmp_path, cache_dir):
    from layout_retouch.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--base", str(tiny_dir / "base"), "--personalized", str(tiny_dir / "dreambooth"),
                 "--token", "sks", "--class-word", "dog", "--prompt", "a sks dog in the snow", "--out", str(out),
                 "--reference", str(tiny_dir / "reference.png"), "--steps", "4", "--ref-start-step", "1",
                 "--segmenter", "none", "--mask-attention-resolution", "0.5", "--inversion-cache-dir", cache_dir,
                 "--save-intermediates", "--quiet"])
    assert code == 0
    (image,) = out.rglob("seed42_0-*.png")  # named by a digest of the prompt and parameters
    folder = image.with_suffix("")
    names = {p.name for p in folder.iterdir()}
    assert {"layout.png", "reference_reconstruction.png", "mask_m_ca.png", "mask_m_sam.png", "mask_union.png",
            "mask_final.png"} <= names
    assert any(n.startswith("attention_target_step") for n in names)


@pytest.mark.parametrize("personalized,token", [("lora", "sks"), ("custom_diffusion", "<new1>")])
def test_full_method_composes_with_adapted_attention(tiny_dir, cache_dir, personalized, token):
    """LoRA layers and merged Custom Diffusion projections act inside the method's processor."""
    def full(pipe):
        config = LayoutRetouchConfig(method="V", inversion_cache_dir=cache_dir, **TINY)
        return pipe(f"a {token} dog in the snow", reference_image=tiny_dir / "reference.png", config=config,
                    generator=torch.Generator().manual_seed(5), output_type="latent").images

    def load(path):
        return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=path, token=token,
                                                     class_word="dog", progress=False)

    tuned = load(str(tiny_dir / personalized))
    result = full(tuned)
    assert torch.isfinite(result).all()
    tuned.models.switch(False)  # the same shared UNet with the adaptation switched off
    tuned.models.switch = None
    tuned.models._state = None
    assert not torch.allclose(result, full(tuned), atol=1e-4)


def test_the_mask_reads_a_whole_steps_subject_map_not_the_first_layers_alone():
    """A blend layer that runs before some map layers (a small UNet's decoder) builds M from the last step's
    map of every map layer; the reference's key mask keeps reading the step so far."""
    controller = AttentionController(ControlPlan(map_layers={"enc", "dec"}), latent_size=(2, 2))
    full = [torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2)]
    controller.begin_step(0)
    controller.add_maps(TARGET, full[0][0])
    assert torch.equal(controller.subject_map(TARGET, complete=True), full[0][0])  # no step before: the partial
    controller.add_maps(TARGET, full[1][0])
    controller.begin_step(1)
    encoder_only = torch.rand(1, 2, 2)
    controller.add_maps(TARGET, encoder_only)
    assert torch.allclose(controller.subject_map(TARGET, complete=True), (full[0][0] + full[1][0]) / 2)
    assert torch.equal(controller.subject_map(TARGET), encoder_only)
