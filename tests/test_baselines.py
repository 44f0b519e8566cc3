"""The paper's baselines (FreeU, MagicFusion, DreamMatcher) on tiny models: off they are plain sampling, on they
act, and each core rule does what its paper says."""

import pytest
import torch

from layout_retouch.baselines.magicfusion import MagicFusionConfig, blend, fusion_mask
from layout_retouch.config import LayoutRetouchConfig, resolve_method
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.pipeline import LayoutRetouchPipeline

STEPS = 6
TINY = dict(num_inference_steps=STEPS, mask_attention_resolution=0.5, segmenter="none", ref_start_step=2)
PROMPT = "a sks dog in the snow"
FREEU_OFF = dict(b1=1.0, b2=1.0, s1=1.0, s2=1.0)
MAGICFUSION_OFF = dict(fusion_start_timestep=-1, before="personalized")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"),
                                                 token="sks", class_word="dog", progress=False)


def run(pipe, method, n=2, seed=7, reference=None, **config):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(PROMPT, reference_image=reference, config=LayoutRetouchConfig(method=method, **TINY, **config),
                num_images_per_prompt=n, generator=generator, output_type="latent").images


def test_baselines_are_methods():
    for name in ("freeu", "FreeU", "magicfusion", "MagicFusion", "dreammatcher", "DreamMatcher"):
        assert LayoutRetouchConfig(method=resolve_method(name)).is_baseline
    assert not LayoutRetouchConfig(method="I").is_baseline
    assert LayoutRetouchConfig(method="dreammatcher").uses_reference  # the CLI asks for --reference
    assert not LayoutRetouchConfig(method="magicfusion").uses_reference


def test_unknown_baseline_name_is_an_error():
    with pytest.raises(LayoutRetouchError, match="unknown baselines in `baselines`: freu"):
        LayoutRetouchConfig(baselines={"freu": {"b1": 1.5}})


def test_unknown_baseline_hyperparameter_is_an_error(pipe):
    with pytest.raises(LayoutRetouchError, match="unknown freeu hyperparameters: b3"):
        run(pipe, "freeu", baselines={"freeu": {"b3": 1.0}})


# --- FreeU
def test_freeu_with_unit_factors_is_plain_sampling(pipe):
    assert torch.equal(run(pipe, "freeu", baselines={"freeu": FREEU_OFF}), run(pipe, "I"))


def test_freeu_changes_the_output_and_leaves_the_unet_as_found(pipe):
    plain = run(pipe, "I")
    assert not torch.allclose(run(pipe, "freeu"), plain)
    assert torch.equal(run(pipe, "I"), plain)  # FreeU is off again after its run


# --- MagicFusion
def test_magicfusion_never_blending_on_the_personalized_model_is_plain_sampling(pipe):
    assert torch.equal(run(pipe, "magicfusion", baselines={"magicfusion": MAGICFUSION_OFF}), run(pipe, "I"))


def test_magicfusion_changes_the_output(pipe):
    plain = run(pipe, "I")
    blended = run(pipe, "magicfusion", baselines={"magicfusion": {"before": "personalized"}})
    assert not torch.allclose(blended, plain)
    pipe.models.scheduler.set_timesteps(STEPS)
    second = int(pipe.models.scheduler.timesteps[1])  # the vanilla model alone at the first step only
    vanilla_first = run(pipe, "magicfusion", baselines={"magicfusion": {"fusion_start_timestep": second}})
    assert not torch.allclose(vanilla_first, blended)


def _halves_guidance(strong_left: bool, h=8, w=8, strong=3.0, weak=0.1):
    g = torch.full((1, 4, h, w), weak)
    cols = slice(0, w // 2) if strong_left else slice(w // 2, w)
    g[..., cols] = strong
    return g


@pytest.mark.parametrize("kernel", [1, 4])
def test_fusion_mask_follows_the_more_salient_model(kernel):
    """The vanilla model is confident on the left, the personalized one on the right: each wins its half."""
    config = MagicFusionConfig(smoothing_kernel=kernel)
    mask = fusion_mask(_halves_guidance(True), _halves_guidance(False), config)[0, 0]
    w = mask.shape[1]
    margin = kernel // 2  # the box filter blurs the border between the halves
    assert not mask[:, : w // 2 - margin].any() and mask[:, w // 2 + margin:].all()


def test_fusion_mask_ties_go_to_the_vanilla_model():
    g = _halves_guidance(True)
    assert not fusion_mask(g, g.clone(), MagicFusionConfig()).any()


def test_blend_takes_each_pixel_from_the_winning_models_guided_noise():
    scale = 2.0
    zeros = torch.zeros(1, 4, 8, 8)
    vanilla = (zeros, _halves_guidance(True) / scale)  # guidance term = scale * (c - u) = the halves map
    personal = (zeros + 1.0, 1.0 + _halves_guidance(False) / scale)
    eps = blend(vanilla, personal, scale, MagicFusionConfig(smoothing_kernel=1))
    guided_v = vanilla[0] + scale * (vanilla[1] - vanilla[0])
    guided_p = personal[0] + scale * (personal[1] - personal[0])
    assert torch.equal(eps[..., :4], guided_v[..., :4]) and torch.equal(eps[..., 4:], guided_p[..., 4:])


# --- the baselines as rows of the toy benchmark and the evaluation
def test_toy_bench_baselines_flag_adds_one_call_and_row_each():
    from layout_retouch.cli import build_parser
    from layout_retouch.cli.toy_bench import settings_from_args
    from layout_retouch.config import BASELINES
    from layout_retouch.toyworld.bench import calls_for

    args = build_parser().parse_args(["toy-bench", "--quick", "--methods", "I", "V", "--baselines"])
    methods = settings_from_args(args).methods
    assert methods == ("I", "V", *BASELINES)
    calls = calls_for(methods)
    assert [c for c in calls if c[0] in BASELINES] == [(b, (b,)) for b in BASELINES]


def test_toy_bench_scales_dreammatchers_step_indices_like_s_ref(tmp_path):
    from layout_retouch.baselines.dreammatcher import DreamMatcherConfig
    from layout_retouch.toyworld.bench import PAPER_STEPS, BenchSettings
    from layout_retouch.toyworld.bench_prompts import default_prompts

    def settings(steps):
        config = BenchSettings(out=tmp_path, prompts=default_prompts(), seeds=(0,), steps=steps).config("dreammatcher")
        return config.baselines.get("dreammatcher", {}), config.ref_start_step

    assert settings(PAPER_STEPS)[0] == {}  # the paper's step count: DreamMatcher's own indices
    half, s_ref = settings(PAPER_STEPS // 2)
    assert half["start_step"] == round(DreamMatcherConfig().start_step / 2) and half["start_step"] == s_ref


def test_toy_bench_reports_baseline_rows(tmp_path):
    from tiny_world import make_base, make_dreambooth

    from layout_retouch.toyworld import bench
    from layout_retouch.toyworld.bench import BenchSettings, run_bench
    from layout_retouch.toyworld.bench_prompts import BenchPrompt
    from layout_retouch.toyworld.datasets import reference_sample

    models = tmp_path / "models"
    make_base(models / "vanilla")
    make_dreambooth(models / "sks_star_dreambooth")
    (models / "references").mkdir()
    reference_sample(0).pil().save(models / "references" / bench.REFERENCE_NAME)
    rows = ("I", "freeu", "magicfusion", "dreammatcher")
    settings = BenchSettings(out=tmp_path / "bench", prompts=[BenchPrompt("a photo of a {} on the beach")],
                             seeds=(0, 1), steps=3, personalizations=("dreambooth",), methods=rows, models_dir=models)
    results = run_bench(settings, log=lambda _: None)
    assert tuple(results["results"]["dreambooth"]) == rows
    table = (settings.out / "table.md").read_text()
    assert all(f"| {row} |" in table for row in rows)


# --- DreamMatcher
DREAMMATCHER_OFF = dict(start_step=STEPS, guidance_weight=0.0)


def run_dreammatcher(pipe, tiny_dir, **settings):
    return run(pipe, "dreammatcher", reference=str(tiny_dir / "reference.png"), baselines={"dreammatcher": settings},
               inversion_cache_dir=str(tiny_dir / "dreammatcher_inversions"))


def test_dreammatcher_matching_nowhere_is_plain_sampling(pipe, tiny_dir):
    assert torch.equal(run_dreammatcher(pipe, tiny_dir, **DREAMMATCHER_OFF), run(pipe, "I"))


def test_dreammatcher_needs_a_reference(pipe):
    with pytest.raises(LayoutRetouchError, match="reference"):
        run(pipe, "dreammatcher")


@pytest.mark.parametrize("settings", [dict(guidance_weight=0.0), dict(start_step=STEPS)],
                         ids=["matching attention", "sampling guidance"])
def test_dreammatcher_changes_the_output_and_restores_the_unet(pipe, tiny_dir, settings):
    """Against the same run that trusts no match (the reference in the batch, nothing borrowed): each part acts
    by more than batching's rounding moves plain sampling."""
    plain = run(pipe, "I")
    early = dict(start_step=1, guidance_start_step=1)
    borrowed = run_dreammatcher(pipe, tiny_dir, **{**early, **settings})
    nothing = run_dreammatcher(pipe, tiny_dir, **early, cycle_threshold=0.0, guidance_weight=0.0)
    assert (borrowed - nothing).abs().max() > (nothing - plain).abs().max()
    assert torch.equal(run(pipe, "I"), plain)  # processors and hooks are gone after the run


def _shifted_pair(channels=24, h=4, w=5, seed=0):
    """Reference features, and a target whose pixel (y, x) shows the reference's pixel (y, x - 1) (wrapping)."""
    reference = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(seed))
    return reference, reference.roll(1, dims=-1)


def test_matching_and_warping_move_a_feature_where_the_match_says():
    from layout_retouch.baselines.matching import cycle_error, descriptors, nearest_matches, warp

    reference, target = _shifted_pair()
    c, h, w = reference.shape
    ref_desc, tgt_desc = descriptors([reference], [target], dims=c // 2)  # through the joint PCA
    t2r, r2t = nearest_matches(tgt_desc, ref_desc)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert torch.equal(t2r, (ys * w + (xs - 1) % w).flatten())
    assert not cycle_error(t2r, r2t, w).any()  # a one-to-one match is consistent everywhere
    values = torch.zeros(h * w, 3)
    values[1 * w + 2] = torch.tensor([1.0, 2.0, 3.0])  # a feature at reference pixel (1, 2)...
    warped = warp(values, t2r)
    moved = warped.abs().sum(1).nonzero().flatten().tolist()
    assert moved == [1 * w + 3] and torch.equal(warped[1 * w + 3], values[1 * w + 2])  # ...lands at target (1, 3)


def test_cycle_error_measures_how_far_a_match_comes_back_and_confidence_thresholds_it():
    from layout_retouch.baselines.matching import confidence, cycle_error

    w = 4
    t2r = torch.zeros(8, dtype=torch.long)  # every target pixel matches reference pixel 0...
    r2t = torch.full((8,), 5)  # ...which matches back to target pixel 5 = (1, 1)
    error = cycle_error(t2r, r2t, w)
    assert error[5] == 0 and error[0] == 2 ** 0.5 and error[3] == (2**2 + 1) ** 0.5
    foreground = torch.ones(8)
    side = 2
    threshold = float(error[0]) / side + 1e-3  # just above pixel 0's error at the full foreground
    kept = confidence(error, foreground, threshold, side)
    assert torch.equal(kept.bool(), error <= error[0])
    assert not confidence(error, foreground * 0.0, threshold, side).any()  # no subject: nothing is trusted


# --- the commands
def _generate(tiny_dir, out, *extra):
    from layout_retouch.cli import main

    args = ["generate", "--base", tiny_dir / "base", "--personalized", tiny_dir / "dreambooth", "--token", "sks",
            "--class-word", "dog", "--out", out, "--steps", 2, "--quiet", "--threads", 1, "--height", 32,
            "--width", 32, "--mask-attention-resolution", 0.5, "--prompt", PROMPT, *extra]
    return main([str(a) for a in args])


def test_generate_runs_each_baseline_with_its_hyperparameters_from_the_config_file(tiny_dir, tmp_path):
    import json

    config = tmp_path / "config.json"
    early = {"start_step": 0, "guidance_start_step": 0}
    config.write_text(json.dumps({"baselines": {"freeu": {"b1": 1.5}, "dreammatcher": early}}))
    for method in ("freeu", "magicfusion", "dreammatcher"):
        out = tmp_path / method
        assert _generate(tiny_dir, out, "--method", method, "--config", config,
                         "--reference", tiny_dir / "reference.png",
                         "--inversion-cache-dir", tmp_path / "inversions") == 0
        (sidecar,) = out.rglob("*.json")
        recorded = json.loads(sidecar.read_text())["config"]
        assert recorded["method"] == method and recorded["baselines"]["freeu"] == {"b1": 1.5}


def test_generate_asks_dreammatcher_for_a_reference(tiny_dir, tmp_path, capsys):
    assert _generate(tiny_dir, tmp_path / "out", "--method", "dreammatcher") != 0
    assert "dreammatcher needs --reference" in capsys.readouterr().err


def test_evaluate_writes_baselines_into_the_table(tmp_path):
    import json

    from metric_tiny_models import build_tiny_metric_models, make_concept, metric_cli_args

    from layout_retouch.cli import main
    from layout_retouch.evaluation.concepts import load_concept
    from layout_retouch.evaluation.report import METHOD_LABELS
    from layout_retouch.tiny_models import save_tiny_pipeline

    models = build_tiny_metric_models(tmp_path / "metric_models")
    base = save_tiny_pipeline(tmp_path / "base")
    concept = load_concept(make_concept(tmp_path / "concepts" / "dog1"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the snow\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_inference_steps": 2, "mask_attention_resolution": 0.5,
                                  "baselines": {"dreammatcher": {"start_step": 1, "guidance_start_step": 1}}}))
    methods = ("I", "freeu", "magicfusion", "dreammatcher")
    out = tmp_path / "out"
    assert main(["evaluate", "--concepts", str(concept.folder), "--out", str(out), "--base", str(base),
                 "--methods", ",".join(methods), "--prompts", str(prompts), "--seeds", "1", "--config", str(config),
                 "--no-progress", *metric_cli_args(models)]) == 0
    assert sorted(p.parts[-4] for p in (out / "images").rglob("*.png")) == sorted(methods)
    table = (out / "table.md").read_text()
    assert all(METHOD_LABELS[m] in table for m in methods)


def test_speed_benchmark_times_each_baseline_beside_plain_sampling(capsys):
    import importlib.util
    from pathlib import Path

    from layout_retouch.config import BASELINES

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)

    args = speed.parse_args(["--quick", "--baselines"])
    variants = speed.configs(args)
    assert [variants[name].method for name in BASELINES] == list(BASELINES)
    assert speed.parse_args(["--quick", "--baselines", "freeu"]).baselines == ["freeu"]
    assert speed.parse_args(["--quick"]).baselines is None
    seconds = {name: [float(i + 1)] for i, name in enumerate(variants)}  # plain 1 s, full 2 s, then 3, 4, 5
    timing = {"seconds": seconds, "evaluations": {name: (1.0, 1.0) for name in variants}, "peaks": {}, "ops": {}}
    speed.summarize(args, timing, {})
    printed = capsys.readouterr().out
    for name in BASELINES:
        assert f"ratio {name}/plain {seconds[name][0] / seconds['plain'][0]:.3f}" in printed
    assert printed.strip().splitlines()[-1] == f"ratio {seconds['full'][0] / seconds['plain'][0]:.3f}"


def test_appearance_matching_attention_reads_the_references_values_at_the_matched_pixels():
    """The target keeps its queries and keys and reads, where the mask is on, the reference's values moved by the
    matching; the reference rows attend as usual."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    from layout_retouch.baselines.dreammatcher import DreamMatcherConfig
    from layout_retouch.baselines.matching_attention import MatchingAttnProcessor

    torch.manual_seed(0)
    side, heads, width = 3, 2, 8
    attn = Attention(query_dim=width, heads=heads, dim_head=width // heads)
    x = torch.randn(4, side * side, width)  # rows: reference uncond, reference cond, target uncond, target cond
    flow = torch.randperm(side * side)[None]  # target pixel i matches reference pixel flow[0, i]
    mask = (torch.arange(side * side) % 2).float()[None]  # the odd pixels borrow, the even ones keep their own
    control = SimpleNamespace(
        map_layers=set(), match_layers={"layer"}, active=True, latent_size=(side, side), n=1,
        settings=DreamMatcherConfig(), target_rows=lambda half: slice(2 + half, 3 + half),
        matches=lambda half, size: (flow, mask))
    out = MatchingAttnProcessor(control, "layer")(attn, x)

    def split(t):
        return t.view(t.shape[0], -1, heads, width // heads).transpose(1, 2)

    for half in (0, 1):
        target, reference = x[2 + half: 3 + half], x[half: half + 1]
        q, k, v = split(attn.to_q(target)), split(attn.to_k(target)), split(attn.to_v(target))
        v_ref = split(attn.to_v(reference))[:, :, flow[0]]
        m = mask[0][None, None, :, None]
        expected = F.scaled_dot_product_attention(q, k, m * v_ref + (1 - m) * v)
        expected = attn.to_out[0](expected.transpose(1, 2).reshape(1, -1, width))
        assert torch.allclose(out[2 + half], expected[0], atol=1e-6)
        q, k, v = (split(p(reference)) for p in (attn.to_q, attn.to_k, attn.to_v))
        plain = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, width))
        assert torch.allclose(out[half], plain[0], atol=1e-6)
