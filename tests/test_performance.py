"""The speed-ups give the straightforward implementation's images, and the reference cache knows when it is stale.

Every optimization (source_features.py, attention_control.py) is a config switch; each one alone and all
together are compared with all of them off, on tiny models, for the ablation rows and settings that touch
different parts of the recorded features. No timings here: benchmarks/speed.py measures them.
"""

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import layout_retouch.attention_control as attention_control
import layout_retouch.pipeline as pipeline_module
import layout_retouch.source_features as source_features
import layout_retouch.stage2_retouch as stage2_retouch
from layout_retouch.config import STRAIGHTFORWARD, LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.inversion import DDIMInversion, InversionCache, ddim_invert
from layout_retouch.pipeline import LayoutRetouchPipeline
from layout_retouch.sampling import encode_text
from layout_retouch.source_features import HOST, feature_homes
from layout_retouch.stage1_layout import step_blended_denoise

STEPS = 6
TINY = dict(num_inference_steps=STEPS, mask_attention_resolution=0.5, segmenter="none", ref_start_step=2)
ALL = {name: True for name in STRAIGHTFORWARD}
SWITCHES = {"record_layout": dict(record_layout_features=True), "cache_reference": dict(cache_reference_features=True),
            "skip_replaced": dict(skip_replaced_attention=True), "share_inversion": dict(share_inversion_calls=True),
            "batch_maps": dict(batch_subject_maps=True),
            # alone it would leave nothing to ride with a layout on the vanilla model at step 0 (TINY: T_l = 1)
            "pipeline_stages": dict(pipeline_stages=True, record_layout_features=True),
            # alone it would change nothing: without recorded reference features the reference reads every latent
            "truncate_inversion": dict(truncate_inversion=True, cache_reference_features=True,
                                       share_inversion_calls=True),
            "defer_reconstruction": dict(defer_reference_reconstruction=True),
            "all": ALL, "all_offloaded": dict(ALL, feature_offload=True)}
PROMPT = "a sks dog in the snow"
TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # float rounding of other batch shapes, no more


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"),
                                                 token="sks", class_word="dog", progress=False)


@pytest.fixture(scope="module")
def lora_pipe(tiny_dir):
    return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "lora"),
                                                 token="sks", class_word="dog", progress=False)


class RowCounter:
    """Batch rows and calls through every UNet of a pipeline (a forward pre-hook): the paths that really ran."""

    def __init__(self, pipe):
        self.rows = self.calls = 0
        unets = {id(u): u for u in pipe.models.unets()}.values()
        self.handles = [u.register_forward_pre_hook(self.count) for u in unets]

    def count(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def generate(pipe, cache_dir, prompt=PROMPT, reference=None, n=2, seed=5, intermediates=False, **config):
    config = LayoutRetouchConfig(inversion_cache_dir=str(cache_dir), **{**TINY, **config})
    reference = reference if reference is not None else pipe.reference_path
    return pipe(prompt, reference_image=reference, config=config, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(seed), output_type="latent",
                save_intermediates=intermediates)


@pytest.fixture(autouse=True)
def fresh(pipe, lora_pipe, tiny_dir):
    for p in (pipe, lora_pipe):
        p.reference_path = tiny_dir / "reference.png"
        p.clear_feature_cache()


SETTINGS = {
    "V": dict(method="V"),
    "V_layout_on_vanilla_model_early": dict(method="V", vanilla_steps=3),
    "V_qkv_early_swap": dict(method="V", early_swap="qkv", vanilla_steps=1),
    "V_blend_from_step_0": dict(method="V", mask_start_step=0, vanilla_steps=1),
    "V_reference_from_step_0_all_keys": dict(method="V", ref_start_step=0, ref_subject_only=False),
    "IV": dict(method="IV", vanilla_steps=1),
    "III": dict(method="III", vanilla_steps=1),
    # the target starts at step 3: the layout's recorder keeps nothing of the steps before it
    "V_target_from_the_layout": dict(method="V", vanilla_steps=3, target_start="layout", mask_start_step=1),
}


@pytest.fixture(scope="module")
def straightforward(pipe, tmp_path_factory):
    """The straightforward run of each setting, made once for all the switches compared with it."""
    folder, done = tmp_path_factory.mktemp("straightforward"), {}

    def get(setting):
        if setting not in done:
            done[setting] = generate(pipe, folder, **SETTINGS[setting], **STRAIGHTFORWARD)
        return done[setting]

    return get


@pytest.mark.parametrize("setting,switch", [(setting, "all") for setting in SETTINGS]
                         + [("V", switch) for switch in SWITCHES if switch != "all"])
def test_optimizations_give_the_straightforward_images(pipe, tmp_path, straightforward, setting, switch):
    """All switches on, for every setting; each switch alone, for the full method."""
    config = SETTINGS[setting]
    reference = straightforward(setting)
    optimized = generate(pipe, tmp_path, **config, **{**STRAIGHTFORWARD, **SWITCHES[switch]})
    assert torch.allclose(optimized.images, reference.images, **TOLERANCE)
    for name, mask in reference.masks.items():
        assert (optimized.masks[name] == mask).mean() > 0.99, name  # a rounding flip at a threshold at most


PIPELINED = {  # setting -> config; the straightforward run of each is the same config with STRAIGHTFORWARD
    "V": dict(method="V"),
    "V_layout_on_vanilla_model_early": dict(method="V", vanilla_steps=3),
    "V_reference_before_the_mask": dict(method="V", vanilla_steps=1, mask_start_step=4),
    "IV_no_mask_every_step_can_ride": dict(method="IV", vanilla_steps=1),
    # no recorded sources: the layout's and the reference's rows ride with the target (the inversion, not shared,
    # is done before Stage 1)
    "V_paths_ride_too": dict(method="V", vanilla_steps=0, **{**STRAIGHTFORWARD, "pipeline_stages": True}),
}


@pytest.mark.parametrize("setting", PIPELINED)
def test_stage_2_rides_in_stage_1_calls(pipe, lora_pipe, tmp_path, setting):
    """pipeline_stages: Stage 2's steps that need no mask ride in Stage 1's calls (a timestep per row), for two
    prompts of a concept in a row (the first inverts the reference in the calls and records its features, the
    second reuses them), two seeds in a batch, under CFG, with DreamBooth (two UNets) and LoRA (one, switched):
    fewer calls, the same rows, the straightforward images."""
    config = PIPELINED[setting]
    for models in (pipe, lora_pipe) if setting == "V" else (pipe,):
        counts, images = {}, {}
        for name, switch in (("pipelined", {}), ("after", dict(pipeline_stages=False)), ("straight", STRAIGHTFORWARD)):
            models.clear_feature_cache()
            counts[name], images[name] = [], []
            for prompt, seed in ((PROMPT, 5), ("a sks dog on the beach", 7)):
                with RowCounter(models) as counter:
                    images[name].append(generate(models, tmp_path / name, prompt=prompt, seed=seed,
                                                 **{**config, **switch}).images)
                counts[name].append((counter.calls, counter.rows))
        for got, expected in zip(images["pipelined"], images["straight"], strict=True):
            assert torch.allclose(got, expected, **TOLERANCE)
        for (calls, rows), (calls_after, rows_after) in zip(counts["pipelined"], counts["after"], strict=True):
            assert rows == rows_after and calls < calls_after
        if setting == "V":  # TINY: T_l = 1, S_mask = S_ref = 2: Stage 2's steps 0 and 1 ride in Stage 1's calls 1, 2
            mask_start = LayoutRetouchConfig(**TINY).mask_start
            assert [calls for calls, _ in counts["pipelined"]] == [2 * STEPS - mask_start] * 2


def test_lora_one_unet_gives_the_straightforward_images(lora_pipe, tmp_path):
    reference = generate(lora_pipe, tmp_path, method="V", vanilla_steps=2, **STRAIGHTFORWARD)
    optimized = generate(lora_pipe, tmp_path, method="V", vanilla_steps=2)
    assert torch.allclose(optimized.images, reference.images, **TOLERANCE)


def test_intermediates_are_the_same_with_recorded_sources(pipe, tmp_path):
    reference = generate(pipe, tmp_path, method="V", intermediates=True, **STRAIGHTFORWARD)
    optimized = generate(pipe, tmp_path, method="V", intermediates=True)
    assert set(optimized.attention_maps) == set(reference.attention_maps)
    for role, maps in reference.attention_maps.items():
        assert torch.allclose(torch.as_tensor(optimized.attention_maps[role]), torch.as_tensor(maps), **TOLERANCE)
    assert optimized.reference_reconstruction.tobytes() == reference.reference_reconstruction.tobytes()


def test_recorded_sources_do_not_run_again(pipe, tmp_path):
    """Rows through the UNet: the layout path leaves Stage 2, the reference runs once for two prompts."""
    n, inversion, stage1 = 2, STEPS, STEPS * 2 * 2
    with RowCounter(pipe) as straight:
        for prompt in (PROMPT, "a sks dog on the beach"):
            generate(pipe, tmp_path, prompt=prompt, n=n, method="V", **STRAIGHTFORWARD)
    # Per prompt: inversion (cached on disk after the first), Stage 1, Stage 2 with reference, layout, target.
    assert straight.rows == inversion + 2 * (stage1 + STEPS * 2 * (1 + n + n))
    with RowCounter(pipe) as fast:
        for prompt in (PROMPT, "a sks dog on the beach"):
            generate(pipe, tmp_path / "fresh", prompt=prompt, n=n, method="V")
    # once, from S_ref (the tiny UNet's map layers come before its reference layers: the key mask at S_ref reads
    # that step's map, not the step before's)
    reference_pass = (STEPS - TINY["ref_start_step"]) * 2
    # the inversion only as deep as the reference path reads it: up to S_ref's latent (truncate_inversion)
    truncated = STEPS - TINY["ref_start_step"]
    assert fast.rows == truncated + reference_pass + 2 * (stage1 + STEPS * 2 * n)
    assert pipe._reference_cache.computed == 1
    # ... inside the first prompt's Stage 2 calls: no separate reference pass; the inversion's steps ride in
    # Stage 1's calls, and those beside the steps on the vanilla model (another UNet) in Stage 2's; Stage 2's
    # steps before S_mask ride in Stage 1's calls (pipeline_stages), one call per step and stage from S_mask on.
    vanilla = LayoutRetouchConfig(**TINY).num_vanilla_steps
    assert straight.calls == inversion + 2 * (STEPS + STEPS + vanilla)  # Stage 2's layout on vanilla: own call
    mask_start = LayoutRetouchConfig(**TINY).mask_start
    assert 0 < vanilla < STEPS and 0 < mask_start and fast.calls == 2 * (STEPS + STEPS - mask_start)


def stored_inversion(folder) -> tuple[str, torch.Tensor]:
    """The one trajectory an inversion cache folder holds: its kind (complete or partial) and its latents."""
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    key, _, kind = files[0].name.removesuffix(".safetensors").partition(".")
    cache = InversionCache(folder)
    if kind == "partial":
        return kind, torch.cat(cache.load_partial(key, "cpu", torch.float32)[::-1])
    return "complete", torch.cat(cache.load(key, "cpu", torch.float32).latents)


def test_the_inversion_goes_only_as_deep_as_stage_2_reads(pipe, tmp_path):
    """truncate_inversion: a concept's first call inverts the reference only up to S_ref's latent (the reference
    path runs from there to record its features), S_ref rows fewer in the same calls, the same images; the disk
    holds that part of a full inversion. A later call that reads deeper (maps saved: the reference from step 0)
    goes on from the deepest latent, to the full inversion's latents and images, without its first steps."""
    start = TINY["ref_start_step"]  # the tiny UNet's reference runs from S_ref (test above)
    with RowCounter(pipe) as full_rows:
        full = generate(pipe, tmp_path / "full", method="V", truncate_inversion=False)
    pipe.clear_feature_cache()
    with RowCounter(pipe) as truncated_rows:
        truncated = generate(pipe, tmp_path / "truncated", method="V")
    assert truncated_rows.rows == full_rows.rows - start and truncated_rows.calls == full_rows.calls
    assert torch.allclose(truncated.images, full.images, **TOLERANCE)
    kind, latents = stored_inversion(tmp_path / "truncated")
    _, full_latents = stored_inversion(tmp_path / "full")
    assert kind == "partial" and len(latents) == STEPS - start + 1 and len(full_latents) == STEPS + 1
    assert torch.allclose(latents, full_latents[start:], **TOLERANCE)  # latents[k] is step k's; the clean last

    with RowCounter(pipe) as deeper_full:
        expected = generate(pipe, tmp_path / "full_maps", method="V", intermediates=True, truncate_inversion=False)
    pipe.clear_feature_cache()  # (the features it recorded would serve the next call: no latent read at all)
    with RowCounter(pipe) as deeper:
        extended = generate(pipe, tmp_path / "truncated", method="V", intermediates=True)
    assert deeper.rows == deeper_full.rows - (STEPS - start)  # the steps on disk are not taken again
    assert torch.allclose(extended.images, expected.images, **TOLERANCE)
    kind, latents = stored_inversion(tmp_path / "truncated")
    assert kind == "complete" and torch.allclose(latents, full_latents, **TOLERANCE)


def test_the_reference_reconstruction_is_decoded_when_first_read(pipe, tmp_path, monkeypatch):
    """defer_reference_reconstruction: no VAE decode for it in the call; the first read makes the eager call's
    image, later reads and the concept's later outputs reuse it; a pickle holds the image; BaseOutput's keys are
    the eager output's."""
    vae, decodes = pipe.models.vae, []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs))
    eager = generate(pipe, tmp_path, method="V", defer_reference_reconstruction=False)
    eager_decodes = len(decodes)
    pipe.clear_feature_cache()  # and the kept reconstruction
    decodes.clear()
    lazy = generate(pipe, tmp_path, method="V")
    assert len(decodes) == eager_decodes - 1
    image = lazy.reference_reconstruction
    assert len(decodes) == eager_decodes and image.tobytes() == eager.reference_reconstruction.tobytes()
    assert lazy.reference_reconstruction is image and len(decodes) == eager_decodes
    other = generate(pipe, tmp_path, prompt="a sks dog on the beach", method="V")
    decodes.clear()
    assert other.reference_reconstruction.tobytes() == image.tobytes() and not decodes
    assert list(lazy.keys()) == list(eager.keys())
    unread = generate(pipe, tmp_path, method="V", seed=9)
    pipe.clear_feature_cache()
    copied = pickle.loads(pickle.dumps(unread))
    assert copied.reference_reconstruction.tobytes() == image.tobytes()


def test_the_reference_runs_from_the_step_before_s_ref_only_where_its_map_would_come_late(pipe):
    """Its key mask at S_ref reads the subject map of the step so far: the step before is needed only where no
    map layer runs before the first reference layer (not so in the tiny UNet, nor SD 1.x/2.x or SDXL)."""
    unet = pipe.models.pipe.unet
    plan = attention_control.build_plan(LayoutRetouchConfig(**TINY), unet, swap_layout=True, swap_reference=True,
                                        blend=True)
    assert pipeline_module.reference_start(plan, unet) == TINY["ref_start_step"]
    last_map = [layer.name for layer in attention_control.attention_layers(unet) if layer.cross][-1:]
    late = dataclasses.replace(plan, map_layers=set(last_map))
    assert pipeline_module.reference_start(late, unet) == TINY["ref_start_step"] - 1
    assert pipeline_module.reference_start(dataclasses.replace(late, ref_subject_only=False), unet) == \
        TINY["ref_start_step"]


def test_an_inversion_riding_in_stage_1_takes_the_steps_it_takes_alone(pipe):
    """An unguided row with its own timestep in Stage 1's calls: the same inversion, the same layout, fewer calls."""
    models, vanilla_steps = pipe.models, 2
    models.scheduler.set_timesteps(STEPS)
    timesteps = models.scheduler.timesteps
    unet, text_encoder = models.select(True)
    size = unet.config.sample_size
    clean, noise = torch.randn((2, 1, 4, size, size), generator=torch.Generator().manual_seed(1))
    empty = encode_text(models.tokenizer, text_encoder, "")
    cond = pipe.encode_prompts(pipe.derive_prompts(PROMPT))
    alone = ddim_invert(unet, models.scheduler, clean, timesteps, empty, progress=False)
    layout = step_blended_denoise(models, noise, timesteps, vanilla_steps, cond.vanilla, cond.personalized, 7.5,
                                  progress=False)
    riding = DDIMInversion(models.scheduler, clean, timesteps, empty)
    with RowCounter(pipe) as counter:
        shared = step_blended_denoise(models, noise, timesteps, vanilla_steps, cond.vanilla, cond.personalized, 7.5,
                                      progress=False, inversion=riding)
    # Beside the vanilla steps (another UNet) the inversion waits (Stage 2 carries those); after them it rides along.
    assert counter.calls == STEPS and counter.rows == STEPS * 2 + STEPS - vanilla_steps
    assert len(riding.states) == 1 + STEPS - vanilla_steps
    for a, b in zip(riding.run(unet, progress=False).latents, alone.latents, strict=True):
        assert torch.allclose(a, b, **TOLERANCE)
    for a, b in zip(shared.latents, layout.latents, strict=True):
        assert torch.allclose(a, b, **TOLERANCE)


def test_textual_inversion_runs_its_vanilla_steps_in_the_same_calls(tiny_dir, tmp_path):
    """One UNet for both models: the inversion rides beside the vanilla steps too, and the straightforward
    Stage 2 runs its vanilla-model layout in the target's call."""
    ti = LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(
        tiny_dir / "learned_embeds.safetensors"), token="<cat-toy>", class_word="toy", progress=False)
    ti.reference_path = tiny_dir / "reference.png"
    assert ti.models.one_unet
    with RowCounter(ti) as counter:
        straight = generate(ti, tmp_path / "a", prompt="a <cat-toy> in the snow", method="V", vanilla_steps=2,
                            **STRAIGHTFORWARD)
    assert counter.calls == STEPS + 2 * STEPS  # inversion alone, then one call per step and stage
    with RowCounter(ti) as counter:
        fast = generate(ti, tmp_path / "b", prompt="a <cat-toy> in the snow", method="V", vanilla_steps=2)
    assert counter.calls == 2 * STEPS - TINY["ref_start_step"]  # Stage 2's steps before S_mask ride in Stage 1's
    assert torch.allclose(fast.images, straight.images, **TOLERANCE)


def test_only_the_prompts_a_run_reads_are_encoded(pipe, tmp_path):
    encoders = {id(m): m for m in (pipe.models.pipe.text_encoder, pipe.models.personal_text_encoder) if m is not None}
    texts = []
    handles = [m.register_forward_pre_hook(lambda module, args: texts.append(args[0])) for m in encoders.values()]
    try:
        generate(pipe, tmp_path, n=1, method="I", vanilla_steps=0)  # plain sampling: P_p and the empty prompt
        assert len(texts) == 2
        texts.clear()
        generate(pipe, tmp_path, n=1, method="V")  # P_v, P_p, P_n; the empty prompt once per text encoder...
        assert len(texts) == 3 + len(encoders) + 1  # ... and for the reference's inversion (not yet on disk)
    finally:
        for handle in handles:
            handle.remove()


def test_over_budget_falls_back_to_running_the_paths(pipe, tmp_path):
    reference = generate(pipe, tmp_path, method="V", **STRAIGHTFORWARD)
    with RowCounter(pipe) as counter:
        over = generate(pipe, tmp_path, method="V", layout_feature_budget_mb=0, reference_feature_budget_mb=0)
    assert torch.allclose(over.images, reference.images, **TOLERANCE)
    assert counter.rows == STEPS * 2 * 2 + STEPS * 2 * (1 + 2 + 2)  # inversion cached on disk: Stage 1 + 2 only
    assert pipe._reference_cache.computed == 0


def test_replaced_target_attention_is_not_computed(pipe, tmp_path, monkeypatch):
    rows = []
    real = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        rows.append(query.shape[0] * query.shape[2])
        return real(query, *args, **kwargs)

    generate(pipe, tmp_path, method="V", **STRAIGHTFORWARD)  # the reference's inversion, cached on disk
    monkeypatch.setattr(attention_control.F, "scaled_dot_product_attention", spy)
    generate(pipe, tmp_path, method="V", **{**STRAIGHTFORWARD, "skip_replaced_attention": False})
    full = sum(rows)
    rows.clear()
    generate(pipe, tmp_path, method="V", **STRAIGHTFORWARD)
    assert sum(rows) == full  # switched off really is the straightforward path
    rows.clear()
    generate(pipe, tmp_path, method="V", **{**STRAIGHTFORWARD, "skip_replaced_attention": True})
    assert sum(rows) < full


def test_subject_maps_take_one_softmax_per_call(pipe, tmp_path, monkeypatch):
    """Batched, a call's map layers share a softmax (one more where a reader needs the maps between two of them:
    the tiny UNet interleaves its map layers with reference layers); layer by layer, each layer and path has one."""
    softmax = []
    real = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        softmax.append(self.shape)
        return real(self, *args, **kwargs)

    generate(pipe, tmp_path, method="V", **STRAIGHTFORWARD)  # the reference's inversion, cached on disk
    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    with RowCounter(pipe) as counter:  # maps of the layout, read after the call: one softmax per call
        generate(pipe, tmp_path, method="II", intermediates=True, **{**STRAIGHTFORWARD, "batch_subject_maps": True})
    layers = len(attention_control.select_map_layers(attention_control.attention_layers(pipe.models.pipe.unet),
                                                     TINY["mask_attention_resolution"]))
    assert layers > 1 and len(softmax) == counter.calls and {s[0] for s in softmax} == {layers}
    counts = {}
    for batched in (True, False):
        softmax.clear()
        generate(pipe, tmp_path, method="V", **{**STRAIGHTFORWARD, "batch_subject_maps": batched})
        counts[batched] = len(softmax)
    assert counts[True] < counts[False] / 2


def test_layout_features_are_freed_once_used(pipe, tmp_path, monkeypatch):
    """Each step's recorded layout features go when the step is done, all of them before the final decode."""
    real, seen = stage2_retouch.Retouch.__init__, {}

    def spy(self, models, config, controller, *args, **kwargs):
        features, begin = controller.features[attention_control.LAYOUT], controller.begin_step
        seen["features"], seen["held"] = features, []

        def begin_step(step):
            begin(step)
            seen["held"].append(len({s for s, _ in features.entries}))  # steps whose features are still held

        controller.begin_step = begin_step
        return real(self, models, config, controller, *args, **kwargs)

    monkeypatch.setattr(stage2_retouch.Retouch, "__init__", spy)
    after_stage1 = dict(pipeline_stages=False)  # Stage 2 after Stage 1, all of the layout's steps recorded
    kept = generate(pipe, tmp_path, method="V", release_used_features=False, **after_stage1)
    assert seen["held"] == [STEPS] * STEPS and seen["features"].entries
    pipe.clear_feature_cache()  # both runs record the reference alike: the same work, bit for bit
    freed = generate(pipe, tmp_path, method="V", **after_stage1)
    assert seen["held"] == [STEPS - k for k in range(STEPS)]  # TINY: every step lends (early swap, then blend)
    assert not seen["features"].entries
    assert torch.equal(freed.images, kept.images)
    # Pipelined, Stage 2's steps before S_mask run while Stage 1 records (one step behind it, at least): a step's
    # features go when Stage 2 is done with it, none is held longer than without pipelining.
    pipelined = {}
    for release in (False, True):
        pipe.clear_feature_cache()
        pipelined[release] = generate(pipe, tmp_path, method="V", release_used_features=release)
        assert len(seen["held"]) == STEPS and bool(seen["features"].entries) is not release
    assert all(held <= STEPS - k for k, held in enumerate(seen["held"]))
    assert torch.equal(pipelined[True].images, pipelined[False].images)


def test_recorded_features_keep_the_models_precision(tiny_dir, tmp_path, monkeypatch):
    """A half-precision model's recorded layout and reference features are half precision too (half the bytes)."""
    half = LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"),
                                                 token="sks", class_word="dog", torch_dtype=torch.bfloat16,
                                                 progress=False)
    half.reference_path = tiny_dir / "reference.png"
    kept, real = [], source_features.SourceFeatures.put

    def put(self, step, layer, tensors):
        kept.extend((self.keys_restricted, t.dtype) for t in tensors.values())
        return real(self, step, layer, tensors)

    monkeypatch.setattr(source_features.SourceFeatures, "put", put)
    generate(half, tmp_path, method="V")
    assert {restricted for restricted, _ in kept} == {False, True}  # the layout's and the reference's
    assert {dtype for _, dtype in kept} == {torch.bfloat16}


def test_compiled_unets_give_the_same_images(tiny_dir, tmp_path, monkeypatch):
    """compile_unet: torch.compile of the UNets, the method's processor running eagerly inside, same images.

    Dynamo's tracing is what meets the processor; the backend is its "eager" one so that the test takes seconds
    (inductor's code generation for the tiny UNet's graphs takes minutes on a CPU; checked by hand: max 2e-5).
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported in this Python / torch build")
    fresh = LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"),
                                                  token="sks", class_word="dog", progress=False)
    fresh.reference_path = tiny_dir / "reference.png"
    small = dict(num_inference_steps=2, ref_start_step=1)
    expected = generate(fresh, tmp_path, method="V", n=1, **small)
    fresh.clear_feature_cache()
    compile_module, modes = torch.nn.Module.compile, []

    def compile_eagerly(module, mode=None, **kwargs):
        modes.append(mode)
        return compile_module(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    torch._dynamo.reset()
    counters.clear()
    got = generate(fresh, tmp_path, method="V", n=1, compile_unet=True, **small)
    assert modes == [None] * len({id(u) for u in fresh.models.unets()})  # each UNet once, torch's default mode
    assert counters["stats"]["unique_graphs"] > 0  # the UNets really ran through dynamo
    assert torch.allclose(got.images, expected.images, **TOLERANCE)
    generate(fresh, tmp_path, method="V", n=1, compile_unet=True, **small)
    assert len(modes) == len({id(u) for u in fresh.models.unets()})  # compiled once, not per call


def test_reference_cache_is_reused_for_other_prompts_and_seeds(pipe, tmp_path):
    generate(pipe, tmp_path, method="V")
    again = generate(pipe, tmp_path, prompt="a sks dog on the beach", seed=9, n=1, method="IV", vanilla_steps=1)
    assert pipe._reference_cache.computed == 1
    straight = generate(pipe, tmp_path, prompt="a sks dog on the beach", seed=9, n=1, method="IV", vanilla_steps=1,
                        **STRAIGHTFORWARD)
    assert torch.allclose(again.images, straight.images, **TOLERANCE)


def test_reference_cache_is_invalidated_by_model_image_steps_and_size(pipe, tmp_path):
    cache = pipe._reference_cache
    generate(pipe, tmp_path, method="V")
    assert cache.computed == 1
    generate(pipe, tmp_path, method="V", num_inference_steps=STEPS - 1)  # other steps
    assert cache.computed == 2
    generate(pipe, tmp_path, method="V", num_inference_steps=STEPS - 1, height=16, width=16)  # other size
    assert cache.computed == 3
    flipped = Image.open(pipe.reference_path).transpose(Image.FLIP_LEFT_RIGHT)
    generate(pipe, tmp_path, method="V", reference=flipped)  # other image
    assert cache.computed == 4
    unet, _ = pipe.models.select(True)
    weight = dict(unet.named_parameters())["up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # the model changes in place: the cached features are stale
        changed = generate(pipe, tmp_path, method="V", reference=flipped)
        assert cache.computed == 5
        # ... and the result is the changed model's (the inversion, keyed on the load-time model, is not
        # part of this cache, so the straightforward run here shares it).
        straight = generate(pipe, tmp_path, method="V", reference=flipped, **STRAIGHTFORWARD)
        assert torch.allclose(changed.images, straight.images, **TOLERANCE)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    generate(pipe, tmp_path, method="V", reference=flipped)
    assert cache.computed == 6  # back to the old weights: other storage version, recomputed (never stale)


def test_features_wait_on_the_device_within_its_budget_then_in_host_memory():
    cuda, mib = torch.device("cuda"), 2**20
    assert feature_homes("auto", torch.device("cpu"), 10 * mib, 10 * mib, 1) == (None, None)  # nowhere else
    assert feature_homes("auto", cuda, 1 * mib, 2 * mib, 4) == (None, None)
    assert feature_homes("auto", cuda, 1 * mib, 4 * mib, 4) == (None, HOST)  # the reference first
    assert feature_homes("auto", cuda, 5 * mib, 2 * mib, 4) == (HOST, None)
    assert feature_homes("auto", cuda, 5 * mib, 2 * mib, None) == (None, None)
    assert feature_homes(True, torch.device("cpu"), 0, 0, None) == (HOST, HOST)
    assert feature_homes(False, cuda, 5 * mib, 5 * mib, 0) == (None, None)
    with pytest.raises(LayoutRetouchError, match="feature_offload"):
        feature_homes("sometimes", cuda, 0, 0, None)


@pytest.mark.parametrize("personalized,token,word", [("dreambooth", "sks", "dog"),
                                                     ("learned_embeds.safetensors", "<cat-toy>", "toy")])
def test_fused_projections_give_the_same_images(tiny_dir, tmp_path, personalized, token, word):
    """One matmul per attention layer for Q, K, V (our processor and diffusers' alike), weights held once."""
    def load():
        fused = LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / personalized),
                                                      token=token, class_word=word, progress=False)
        fused.reference_path = tiny_dir / "reference.png"
        return fused

    plain_pipe, fused = load(), load()
    fused.fuse_qkv_projections()
    layers = [m for u in fused.models.unets() for m in u.modules() if getattr(m, "fused_projections", False)]
    assert layers
    for attn in layers:  # the separate projections are views of the fused weight: no second copy
        whole = attn.to_kv if hasattr(attn, "to_kv") else attn.to_qkv
        assert attn.to_k.weight.untyped_storage().data_ptr() == whole.weight.untyped_storage().data_ptr()
    calls = {"fused": 0, "separate": 0}
    handles = [attn.to_qkv.register_forward_pre_hook(lambda *a: calls.__setitem__("fused", calls["fused"] + 1))
               for attn in layers if hasattr(attn, "to_qkv")]
    handles += [attn.to_k.register_forward_pre_hook(lambda *a: calls.__setitem__("separate", calls["separate"] + 1))
                for attn in layers]
    try:
        for method in ("I", "V"):
            prompt = f"a {token} in the snow"
            expected = generate(plain_pipe, tmp_path / "a", prompt=prompt, method=method, vanilla_steps=2)
            got = generate(fused, tmp_path / "b", prompt=prompt, method=method, vanilla_steps=2)
            assert torch.allclose(got.images, expected.images, **TOLERANCE), method
    finally:
        for handle in handles:
            handle.remove()
    assert calls["fused"] > 0 and calls["separate"] == 0


def test_fusing_refuses_personalizations_that_switch_the_projections(lora_pipe):
    with pytest.raises(LayoutRetouchError, match="lora"):
        lora_pipe.fuse_qkv_projections()


def test_kept_sources_hold_no_other_tensors_elements():
    """A fused projection's query is a view into the keys and values: kept alone, it is copied out."""
    qkv = torch.randn(2, 5, 12)
    q = qkv.chunk(3, dim=-1)[0].view(2, 5, 2, 2).transpose(1, 2)
    own = attention_control.SourceRows({"q": q}, slice(0, 2)).own("q")
    assert torch.equal(own, q) and own.untyped_storage().nbytes() == q.numel() * q.element_size()
    dense = torch.randn(2, 5, 4).view(2, 5, 2, 2).transpose(1, 2)
    assert attention_control.SourceRows({"q": dense}, slice(0, 2)).own("q") is dense  # no copy
