"""`personalize` on a tiny random SD pipeline: each method trains, saves, loads back through diffusers
and changes what the pipeline draws; checkpoints resume exactly; bad input gets a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from layout_retouch.cli import main
from layout_retouch.errors import ImageInputError, LayoutRetouchError, ModelLoadError, PromptError
from layout_retouch.outputs import plain_file_mode
from layout_retouch.personalize import (
    EMBEDS_FILE,
    LORA_WEIGHTS_FILE,
    METADATA_FILE,
    PersonalizeConfig,
    personalize,
)
from layout_retouch.personalize.data import load_masks, load_photos, subject_masks, subject_photos
from layout_retouch.personalize.loading import detect_method, load_personalized_pipeline
from layout_retouch.personalize.training import masked_mse
from layout_retouch.tiny_models import save_tiny_pipeline

PROMPT = "a photo of sks star"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "sd", seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (32, 32), (48, 36)]):  # not square, not the model's size
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"subject_{i}.png")
    return folder


def config(method, base, photos, output, **overrides) -> PersonalizeConfig:
    settings = dict(max_steps=3, learning_rate=1e-2, checkpoint_every=2, progress=False)
    settings.update(overrides)
    return PersonalizeConfig(method=method, base=str(base), photos=str(photos), output=str(output),
                             **settings)


def load(folder, **components) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: StableDiffusionPipeline, prompt: str = PROMPT) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def test_dreambooth_folder_loads_and_draws_differently(base, photos, tmp_path):
    result = personalize(config("dreambooth", base, photos, tmp_path / "db", learning_rate=1e-3,
                                train_text_encoder=True))
    vanilla, tuned = load(base), load(result.output)
    assert (result.output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not torch.equal(vanilla.unet.conv_in.weight, tuned.unet.conv_in.weight)
    assert not torch.equal(vanilla.text_encoder.get_input_embeddings().weight,
                           tuned.text_encoder.get_input_embeddings().weight)
    torch.testing.assert_close(vanilla.vae.encoder.conv_in.weight, tuned.vae.encoder.conv_in.weight)
    assert np.abs(draw(vanilla) - draw(tuned)).max() > 1e-3
    meta = json.loads((result.output / METADATA_FILE).read_text())
    assert meta["method"] == "dreambooth" and meta["steps"] == 3
    assert meta["config"]["resolution"] == 32  # unet sample size 16 x VAE scale factor 2


def test_dreambooth_prior_preservation_makes_class_images_once(base, photos, tmp_path):
    cfg = config("dreambooth", base, photos, tmp_path / "db", max_steps=1, with_prior_preservation=True,
                 num_class_images=3, class_inference_steps=2, class_data_dir=str(tmp_path / "class"))
    first = personalize(cfg)
    made = sorted((tmp_path / "class").glob("*.png"))
    assert len(made) == 3 and first.class_image_seconds > 0
    stamps = [p.stat().st_mtime_ns for p in made]
    personalize(cfg)  # a rerun reuses them
    assert [p.stat().st_mtime_ns for p in made] == stamps


def test_dreambooth_omit_unchanged_takes_vae_from_base(base, photos, tmp_path):
    result = personalize(config("dreambooth", base, photos, tmp_path / "db", omit_unchanged=True,
                                save_dtype="float16"))
    assert not (result.output / "vae").exists() and not (result.output / "text_encoder").exists()
    vanilla = load(base)
    tuned = load(result.output, vae=vanilla.vae, text_encoder=vanilla.text_encoder, torch_dtype=torch.float32)
    assert tuned.unet.dtype == torch.float32
    assert np.abs(draw(vanilla) - draw(tuned)).max() > 1e-3


def test_dreambooth_unet_trainable_tunes_only_the_named_parameters(base, photos, tmp_path):
    patterns = ("*attn2.to_k.*", "*attn2.to_v.*")  # Custom Diffusion's set
    result = personalize(config("dreambooth", base, photos, tmp_path / "db", unet_trainable=patterns))
    vanilla, tuned = load(base), load(result.output)
    before, after = dict(vanilla.unet.named_parameters()), dict(tuned.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert np.abs(draw(vanilla) - draw(tuned)).max() > 1e-3
    with pytest.raises(LayoutRetouchError, match="attn9"):
        personalize(config("dreambooth", base, photos, tmp_path / "typo", unet_trainable=("*attn9*",)))


def test_dreambooth_text_encoder_trainable_tunes_only_the_named_parameters(base, photos, tmp_path):
    result = personalize(config("dreambooth", base, photos, tmp_path / "db", train_text_encoder=True,
                                text_encoder_trainable=("*token_embedding*",)))
    vanilla, tuned = load(base), load(result.output)
    before, after = dict(vanilla.text_encoder.named_parameters()), dict(tuned.text_encoder.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == {"embeddings.token_embedding.weight"}
    with pytest.raises(LayoutRetouchError, match="--train-text-encoder"):
        personalize(config("dreambooth", base, photos, tmp_path / "x", text_encoder_trainable=("*",)))


def test_lora_file_loads_into_diffusers_and_changes_output(base, photos, tmp_path):
    result = personalize(config("lora", base, photos, tmp_path / "lora", rank=2))
    weights = load_file(result.output / LORA_WEIGHTS_FILE)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any("to_out.0" in k for k in weights) and any("to_q" in k for k in weights)
    assert {w.shape[0] for k, w in weights.items() if "lora.down" in k or "lora_A" in k} == {2}
    pipe = load(base)
    before = draw(pipe)
    pipe.load_lora_weights(result.output)
    with_lora = draw(pipe)
    assert np.abs(with_lora - before).max() > 1e-3
    pipe.unload_lora_weights()
    np.testing.assert_allclose(draw(pipe), before, atol=1e-6)  # the change came from the adapter


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_textual_inversion_embedding_loads_into_diffusers(base, photos, tmp_path, num_vectors):
    result = personalize(config("textual_inversion", base, photos, tmp_path / "ti", token="<sks>",
                                num_vectors=num_vectors))
    embeds = load_file(result.output / EMBEDS_FILE)
    assert list(embeds) == ["<sks>"] and embeds["<sks>"].shape == (num_vectors, 32)
    # shareable like any file the user writes (safetensors alone writes them owner-only)
    assert (result.output / EMBEDS_FILE).stat().st_mode & 0o777 == plain_file_mode()
    pipe = load(base)
    star = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("star</w>")]
    assert not torch.allclose(embeds["<sks>"], star.expand(num_vectors, -1))  # moved from the initializer
    pipe.load_textual_inversion(str(result.output / EMBEDS_FILE), token="<sks>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>"] + [f"<sks>_{i}" for i in range(1, num_vectors)])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], embeds["<sks>"])
    assert np.abs(draw(pipe, "a photo of <sks> star") - draw(pipe, "a photo of star star")).max() > 1e-3


def test_resume_continues_exactly_where_a_run_stopped(base, photos, tmp_path):
    whole = personalize(config("lora", base, photos, tmp_path / "whole", max_steps=6))
    cut = personalize(config("lora", base, photos, tmp_path / "cut", max_steps=4))
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "work" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    resumed = personalize(config("lora", base, photos, tmp_path / "cut", max_steps=6, resume=True))
    assert (cut.steps, resumed.start_step, resumed.steps) == (4, 4, 6)
    a, b = load_file(whole.output / LORA_WEIGHTS_FILE), load_file(resumed.output / LORA_WEIGHTS_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    differs_from_cut = load_file(tmp_path / "cut" / LORA_WEIGHTS_FILE)
    assert differs_from_cut.keys() == a.keys()


def test_resume_refuses_a_checkpoint_made_with_other_settings(base, photos, tmp_path):
    personalize(config("textual_inversion", base, photos, tmp_path / "ti", token="<sks>", max_steps=2))
    with pytest.raises(ModelLoadError, match="learning_rate"):
        personalize(config("textual_inversion", base, photos, tmp_path / "ti", token="<sks>", max_steps=4,
                           learning_rate=0.5, resume=True))


@pytest.mark.parametrize("method,extra", [
    ("dreambooth", ["--train-text-encoder"]),
    ("lora", ["--rank", "2"]),
    ("textual_inversion", ["--token", "<sks>", "--num-vectors", "2"]),
])
def test_cli_trains_each_method(base, photos, tmp_path, method, extra, capsys):
    out = tmp_path / method
    argv = ["personalize", "--method", method, "--base", str(base), "--photos", str(photos), "--output",
            str(out), "--max-steps", "2", "--checkpoint-every", "1", "--lr", "1e-3", "--no-progress", *extra]
    assert main(argv) == 0
    assert f"{method} 2 steps in" in capsys.readouterr().out
    expected = {"dreambooth": "model_index.json", "lora": LORA_WEIGHTS_FILE, "textual_inversion": EMBEDS_FILE}
    assert (out / expected[method]).is_file()
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0  # the later --max-steps wins
    assert "3 steps (resumed at step 2)" in capsys.readouterr().out


def test_errors_name_the_problem(base, photos, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageInputError, match="no images"):
        personalize(config("lora", base, empty, tmp_path / "o"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="cannot read image"):
        personalize(config("lora", base, broken, tmp_path / "o"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        personalize(config("lora", tmp_path / "missing", photos, tmp_path / "o"))
    with pytest.raises(PromptError, match="already in the tokenizer"):
        personalize(config("textual_inversion", base, photos, tmp_path / "o", token="star"))
    argv = ["personalize", "--method", "lora", "--base", str(base), "--photos", str(empty), "--output",
            str(tmp_path / "o")]
    assert main(argv) == 2
    assert "no images" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra", [
    ("dreambooth", dict(omit_unchanged=True)),
    ("lora", {}),
    ("textual_inversion", dict(token="<sks>", num_vectors=2)),
])
def test_load_personalized_pipeline_applies_each_output(base, photos, tmp_path, method, extra):
    result = personalize(config(method, base, photos, tmp_path / method, max_steps=2, **extra))
    assert detect_method(result.output) == method
    pipe = load_personalized_pipeline(str(base), result.output)
    prompt = "a photo of <sks> star" if method == "textual_inversion" else PROMPT
    assert np.abs(draw(pipe, prompt) - draw(load(base), prompt.replace("<sks>", "star"))).max() > 1e-3


def test_masked_loss_counts_only_the_subject():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1.0
    loss = masked_mse(prediction, target, mask)
    changed = target.clone()
    changed[..., 0, :] += 5.0  # row 0 lies outside the mask
    torch.testing.assert_close(masked_mse(prediction, changed, mask), loss)
    torch.testing.assert_close(loss, F.mse_loss(prediction[..., 2:5, 3:6], target[..., 2:5, 3:6]))
    torch.testing.assert_close(masked_mse(prediction, target, torch.ones(2, 1, 8, 8)), F.mse_loss(prediction, target))


def test_masks_are_cropped_as_their_photos(tmp_path):
    photo_dir, mask_dir = tmp_path / "photos", tmp_path / "masks"
    photo_dir.mkdir(), mask_dir.mkdir()
    for i, (h, w) in enumerate([(40, 56), (56, 40)]):  # wide and tall: cropped on either axis
        inside = np.zeros((h, w), bool)
        inside[h // 2 - 6:h // 2 + 14, w // 2 - 14:w // 2 + 2] = True  # off the crop's center
        photo = np.zeros((h, w, 3), np.uint8)
        photo[inside, 0] = 255
        Image.fromarray(photo).save(photo_dir / f"p{i}.png")
        Image.fromarray(inside.astype(np.uint8) * 255).save(mask_dir / f"p{i}.png")
    paths = subject_photos(photo_dir)
    masks = load_masks(subject_masks(paths, mask_dir), 16)
    red = load_photos(paths, 16)[:, :1] > 0
    assert masks.shape == (2, 1, 16, 16)
    assert torch.equal(masks > 0.5, red)
    assert 0.1 < red.float().mean() < 0.5


def test_subject_masks_weigh_the_loss(base, photos, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    full.mkdir(), half.mkdir()
    for path in subject_photos(photos):
        Image.new("L", (40, 40), 255).save(full / f"{path.stem}.png")
        left = np.zeros((40, 40), np.uint8)
        left[:, :20] = 255
        Image.fromarray(left).save(half / f"{path.stem}.png")
    plain = personalize(config("lora", base, photos, tmp_path / "plain"))
    whole = personalize(config("lora", base, photos, tmp_path / "whole", subject_masks=str(full)))
    masked = personalize(config("lora", base, photos, tmp_path / "masked", subject_masks=str(half)))
    a, b, c = (load_file(r.output / LORA_WEIGHTS_FILE) for r in (plain, whole, masked))
    for key in a:  # an all-white mask is the plain loss; half a mask trains something else
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a[key], c[key]) for key in a)
    assert json.loads((masked.output / METADATA_FILE).read_text())["config"]["subject_masks"] == str(half)


def test_subject_mask_errors_name_the_problem(base, photos, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (8, 8), 255).save(masks / "subject_0.png")
    with pytest.raises(ImageInputError, match="no subject mask .* for subject_1.png, subject_2.png"):
        personalize(config("lora", base, photos, tmp_path / "o", subject_masks=str(masks)))
    for i in (1, 2):
        Image.new("L", (8, 8), 0).save(masks / f"subject_{i}.png")
    with pytest.raises(ImageInputError, match="marks nothing as subject"):
        personalize(config("lora", base, photos, tmp_path / "o", subject_masks=str(masks)))
    with pytest.raises(ImageInputError, match="does not exist"):
        personalize(config("lora", base, photos, tmp_path / "o", subject_masks=str(tmp_path / "none")))
    with pytest.raises(ImageInputError, match="folder of their own"):
        personalize(config("lora", base, photos, tmp_path / "o", subject_masks=str(photos)))
