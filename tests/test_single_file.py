"""Single-file checkpoints in the original SD layout: our exporter, and loading them as base or DreamBooth."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_foundation import STEPS, cli, load, plain, sample

from layout_retouch.errors import ModelLoadError
from layout_retouch.models import load_model_pair
from layout_retouch.pipeline import LayoutRetouchPipeline
from layout_retouch.single_file import export_single_file
from layout_retouch.tiny_models import tiny_pipeline

PROMPT = "a sks dog in the snow"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    """The tiny base and the tiny DreamBooth folder of conftest, each as one original-layout file."""
    root = tmp_path_factory.mktemp("single_file")
    dreambooth = StableDiffusionPipeline.from_pretrained(tiny_dir / "dreambooth")
    return {"base": export_single_file(tiny_pipeline(seed=0), root / "base.safetensors"),
            "dreambooth": export_single_file(dreambooth, root / "dreambooth.safetensors")}


def test_round_trip_restores_every_weight(tiny_dir, tmp_path):
    original = tiny_pipeline(seed=1)  # unlike the config folder's weights, so they can only come from the file
    file = export_single_file(original, tmp_path / "model.safetensors")
    loaded = load_model_pair(str(file), base_config=str(tiny_dir / "base")).pipe
    config_folder = tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(loaded, name), getattr(original, name)), name
        assert not same_weights(getattr(config_folder, name), getattr(original, name)), name
    # Landmarks of the original layout: reversed decoder levels, VAE attention as 1x1 convolutions.
    state = load_file(str(file))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert torch.equal(state["first_stage_model.decoder.up.1.upsample.conv.weight"],
                       original.vae.decoder.up_blocks[0].upsamplers[0].conv.weight)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert torch.equal(state["model.diffusion_model.output_blocks.3.2.conv.weight"],
                       original.unet.up_blocks[1].upsamplers[0].conv.weight)


def test_export_refuses_weights_it_cannot_place(tmp_path):
    pipe = tiny_pipeline()
    pipe.unet.extra = torch.nn.Linear(2, 2)  # not part of an SD 1.x UNet: dropping it silently would lose it
    with pytest.raises(ValueError, match="extra.weight"):
        export_single_file(pipe, tmp_path / "model.safetensors")


def test_dreambooth_single_file_is_detected_and_matches_the_folder(tiny_dir, files):
    pipe = load(tiny_dir, personalized=str(files["dreambooth"]))
    assert pipe.models.kind == "dreambooth"
    personal = sample(pipe, PROMPT, vanilla_steps=0).images
    folder = load(tiny_dir, personalized="dreambooth")
    assert torch.equal(personal, sample(folder, PROMPT, vanilla_steps=0).images)
    assert not torch.allclose(personal, sample(load(tiny_dir, token=None), PROMPT, vanilla_steps=0).images)
    # All steps vanilla: plain sampling of the base model with the vanilla prompt.
    base = tiny_pipeline(seed=0)
    assert torch.equal(sample(pipe, PROMPT, vanilla_steps=STEPS).images,
                       plain(base.unet, base.text_encoder, base, "a dog in the snow"))


def test_single_file_base_with_single_file_dreambooth(tiny_dir, files):
    pipe = LayoutRetouchPipeline.from_pretrained(
        str(files["base"]), base_config=str(tiny_dir / "base"), personalized=str(files["dreambooth"]),
        personalization="dreambooth", token="sks", class_word="dog", progress=False)
    folders = load(tiny_dir, personalized="dreambooth")
    for steps in (0, 2, STEPS):
        assert torch.equal(sample(pipe, PROMPT, vanilla_steps=steps).images,
                           sample(folders, PROMPT, vanilla_steps=steps).images), steps


def test_single_file_without_config_names_the_option(files):
    with pytest.raises(ModelLoadError, match="--base-config"):
        load_model_pair(str(files["base"]))  # offline: the config cannot be fetched from the hub


def test_generate_cli_single_file_base(tiny_dir, files, tmp_path, capsys):
    common = ["generate", "--base", files["base"], "--personalized", files["dreambooth"], "--token", "sks",
              "--class-word", "dog", "--out", tmp_path, "--steps", 2, "--method", "II", "--seeds", "1",
              "--prompt", "a sks dog", "--quiet"]
    assert cli(*common) == 2
    assert "--base-config" in capsys.readouterr().err
    assert cli(*common, "--base-config", tiny_dir / "base") == 0
    assert len(list(tmp_path.rglob("*.png"))) == 1
