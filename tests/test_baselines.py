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


def run(pipe, method, n=2, seed=7, **config):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(PROMPT, config=LayoutRetouchConfig(method=method, **TINY, **config), num_images_per_prompt=n,
                generator=generator, output_type="latent").images


def test_baselines_are_methods():
    for name in ("freeu", "FreeU", "magicfusion", "MagicFusion", "dreammatcher", "DreamMatcher"):
        assert LayoutRetouchConfig(method=resolve_method(name)).is_baseline
    assert not LayoutRetouchConfig(method="I").is_baseline
    assert LayoutRetouchConfig(method="dreammatcher").uses_reference  # the CLI asks for --reference
    assert not LayoutRetouchConfig(method="magicfusion").uses_reference


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
    rows = ("I", "freeu", "magicfusion")
    settings = BenchSettings(out=tmp_path / "bench", prompts=[BenchPrompt("a photo of a {} on the beach")],
                             seeds=(0, 1), steps=3, personalizations=("dreambooth",), methods=rows, models_dir=models)
    results = run_bench(settings, log=lambda _: None)
    assert tuple(results["results"]["dreambooth"]) == rows
    table = (settings.out / "table.md").read_text()
    assert all(f"| {row} |" in table for row in rows)
