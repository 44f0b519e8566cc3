"""Stage 1, model loading, prompts, errors and the generate CLI on tiny models."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from tiny_world import make_base, make_photo

from layout_retouch.cli import main
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError, ModelLoadError, PromptError
from layout_retouch.models import load_model_pair
from layout_retouch.pipeline import LayoutRetouchPipeline
from layout_retouch.prompts import derive_prompts, subject_token_indices
from layout_retouch.tiny_models import tiny_tokenizer

STEPS = 6


def load(tiny_dir, kind=None, personalized=None, token="sks", class_word="dog"):
    path = None if personalized is None else str(tiny_dir / personalized)
    return LayoutRetouchPipeline.from_pretrained(str(tiny_dir / "base"), personalized=path, personalization=kind,
                                                 token=token, class_word=class_word, progress=False)


def sample(pipe, prompt, **config):
    cfg = LayoutRetouchConfig(method="II", num_inference_steps=STEPS, **config)
    return pipe(prompt, config=cfg, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                output_type="latent")


def plain(unet, text_encoder, base_pipe, prompt):
    """Plain diffusers sampling with the given UNet and text encoder."""
    sd = StableDiffusionPipeline(vae=base_pipe.vae, text_encoder=text_encoder, tokenizer=base_pipe.tokenizer,
                                 unet=unet, scheduler=base_pipe.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd(prompt, num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=2,
              generator=torch.Generator().manual_seed(7), output_type="latent").images


def test_no_vanilla_steps_is_plain_personalized_sampling(tiny_dir):
    pipe = load(tiny_dir, personalized="dreambooth")
    ours = sample(pipe, "a sks dog in the snow", vanilla_steps=0).images
    unet, te = pipe.models.select(True)
    assert torch.equal(ours, plain(unet, te, pipe.models.pipe, "a sks dog in the snow"))


def test_all_vanilla_steps_is_plain_vanilla_sampling_of_vanilla_prompt(tiny_dir):
    pipe = load(tiny_dir, personalized="dreambooth")
    out = sample(pipe, "a sks dog in the snow", vanilla_steps=STEPS)
    assert out.prompts.vanilla == "a dog in the snow"
    unet, te = pipe.models.select(False)
    assert torch.equal(out.images, plain(unet, te, pipe.models.pipe, "a dog in the snow"))


def test_step_blending_lies_between_and_keeps_trajectory(tiny_dir):
    pipe = load(tiny_dir, personalized="dreambooth")
    blended = sample(pipe, "a sks dog", vanilla_steps=2)
    personal = sample(pipe, "a sks dog", vanilla_steps=0)
    vanilla = sample(pipe, "a sks dog", vanilla_steps=STEPS)
    assert not torch.equal(blended.images, personal.images) and not torch.equal(blended.images, vanilla.images)
    traj = blended.trajectory
    assert len(traj.latents) == STEPS + 1 and traj.vanilla_steps == 2
    # The first T_l steps are the vanilla model's: same as all-vanilla sampling up to there.
    assert torch.equal(traj.latents[2], vanilla.trajectory.latents[2])
    assert not torch.equal(traj.latents[3], vanilla.trajectory.latents[3])
    # The returned image is the decoded last latent of the trajectory.
    cfg = LayoutRetouchConfig(method="II", num_inference_steps=STEPS, vanilla_steps=2)
    images = pipe("a sks dog", config=cfg, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), pipe.decode(traj.latents[-1], "pt"))


def test_vanilla_steps_as_fraction():
    assert LayoutRetouchConfig(num_inference_steps=50, vanilla_steps=0.1).num_vanilla_steps == 5
    assert LayoutRetouchConfig(num_inference_steps=20, vanilla_steps=0.1).num_vanilla_steps == 2
    assert LayoutRetouchConfig(method="I").num_vanilla_steps == 0
    with pytest.raises(LayoutRetouchError, match="vanilla_steps"):
        LayoutRetouchConfig(num_inference_steps=10, vanilla_steps=11)


def test_generator_list_gives_same_images_as_separate_runs(tiny_dir):
    pipe = load(tiny_dir, personalized="dreambooth")
    cfg = LayoutRetouchConfig(method="II", num_inference_steps=3)
    both = pipe("a sks dog", config=cfg, num_images_per_prompt=2, output_type="latent",
                generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]).images
    one = pipe("a sks dog", config=cfg, num_images_per_prompt=1, output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    assert torch.allclose(both[1:], one, rtol=1e-4, atol=1e-4)  # batching changes float rounding only


@pytest.mark.parametrize("kind,personalized,token,class_word", [
    ("dreambooth", "dreambooth", "sks", "dog"),
    ("textual_inversion", "learned_embeds.safetensors", "<cat-toy>", "toy"),
    ("lora", "lora", "sks", "dog"),
    ("custom_diffusion", "custom_diffusion", "<new1>", "dog"),
])
def test_each_personalization_loads_and_changes_output(tiny_dir, kind, personalized, token, class_word):
    pipe = load(tiny_dir, personalized=personalized, token=token, class_word=class_word)
    assert pipe.models.kind == kind
    prompt = f"a {token} {class_word} in the snow"
    personal = sample(pipe, prompt, vanilla_steps=0).images
    base = load(tiny_dir, token=None)
    assert not torch.allclose(personal, sample(base, prompt, vanilla_steps=0).images)
    if kind != "dreambooth":  # shared models: one UNet in memory
        assert pipe.models.personal_unet is None and len(pipe.models.unets()) == 1
    if kind in ("lora", "custom_diffusion"):
        # Switched off, the shared UNet is exactly the base model again.
        vanilla_prompt = f"a {class_word} in the snow"
        assert torch.equal(sample(pipe, prompt, vanilla_steps=STEPS).images,
                           sample(base, vanilla_prompt, vanilla_steps=0).images)


def test_multi_vector_textual_inversion_prompt(tiny_dir):
    pipe = load(tiny_dir, personalized="learned_embeds.safetensors", token="<cat-toy>", class_word="toy")
    prompts = pipe.derive_prompts("a <cat-toy> in the snow")
    assert prompts.vanilla == "a toy in the snow"
    cond = pipe.encode_prompts(prompts)
    expanded = pipe.models.expand_prompt("a <cat-toy> in the snow")
    assert expanded.split()[1:3] == ["<cat-toy>", "<cat-toy>_1"]
    ids = pipe.models.tokenizer(expanded).input_ids
    pieces = pipe.models.tokenizer.convert_ids_to_tokens([ids[i] for i in cond.personalized.tokens])
    assert pieces == ["<cat-toy>", "<cat-toy>_1"]  # both vectors, and no class word in this prompt


def test_prompt_derivation():
    p = derive_prompts("a sks dog wearing a santa hat", "sks", "dog")
    assert (p.personalized, p.vanilla, p.neutral) == (
        "a sks dog wearing a santa hat", "a dog wearing a santa hat", "a photo of a sks dog")
    p = derive_prompts("a <cat-toy> in the snow", "<cat-toy>", "toy")
    assert p.vanilla == "a toy in the snow" and p.neutral == "a photo of a <cat-toy> toy"
    assert derive_prompts("A sks dog, at night", "sks", "dog").vanilla == "A dog, at night"
    # A token that merely contains the class word is not the class word.
    assert derive_prompts("a sks next to a dog", "sks", "dog").vanilla == "a dog next to a dog"
    with pytest.raises(PromptError, match="does not contain the personal token 'sks'"):
        derive_prompts("a dog on the beach", "sks", "dog")
    with pytest.raises(PromptError):
        derive_prompts("a sksdog on the beach", "sks", "dog")


def test_subject_token_positions_multi_piece():
    tok = tiny_tokenizer()
    ids = tok("a sks dog in the snow").input_ids
    assert subject_token_indices(tok, "a sks dog in the snow", ["sks", "dog"]) == [2, 3]
    # "<cat-toy>" is not a word of this tokenizer: it splits into many pieces, all of them found.
    idx = subject_token_indices(tok, "a <cat-toy> in the snow", ["<cat-toy>"])
    pieces = tok.convert_ids_to_tokens([tok("a <cat-toy> in the snow").input_ids[i] for i in idx])
    assert "".join(p.replace("</w>", "") for p in pieces) == "<cat-toy>"
    assert ids[1] == tok.convert_tokens_to_ids("a</w>")


# --- errors, each with a message that names the problem
def test_error_missing_paths(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_pair(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_model_pair(str(tmp_path))
    with pytest.raises(ModelLoadError, match="personalized model .* does not exist"):
        load_model_pair(str(tiny_dir / "base"), str(tmp_path / "missing"), token="sks")


def test_error_hub_unreachable_names_the_id():
    with pytest.raises(ModelLoadError, match="someone/some-model.*local diffusers folder"):
        load_model_pair("someone/some-model")


def test_error_mismatched_unet(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    other.save_pretrained(tmp_path / "db" / "unet")
    with pytest.raises(ModelLoadError, match="does not match the base model.*block_out_channels"):
        load_model_pair(str(tiny_dir / "base"), str(tmp_path / "db"), kind="dreambooth", token="sks")


def test_error_token_not_in_embedding(tiny_dir):
    with pytest.raises(ModelLoadError, match="token '<other>' not found in the embedding"):
        load_model_pair(str(tiny_dir / "base"), str(tiny_dir / "learned_embeds.safetensors"),
                        kind="textual_inversion", token="<other>")


def test_error_embedding_for_another_base(tiny_dir, tmp_path):
    save_file({"<x>": torch.randn(1, 768)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ModelLoadError, match="width 768 but the base text encoder 32"):
        load_model_pair(str(tiny_dir / "base"), str(tmp_path / "e.safetensors"), token="<x>")


def test_error_token_not_in_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = make_base(tmp_path / "base")
    word = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "a": 2, "dog": 3}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=77)
    fast.save_pretrained(base / "tokenizer")
    index = json.loads((base / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (base / "model_index.json").write_text(json.dumps(index))
    from tiny_world import make_dreambooth
    make_dreambooth(tmp_path / "db", text_encoder=False)
    with pytest.raises(ModelLoadError, match="token 'sks' is not in the tokenizer's vocabulary"):
        load_model_pair(str(base), str(tmp_path / "db"), token="sks", class_word="dog")


def test_error_pickle_refused_without_flag(tiny_dir, tmp_path):
    torch.save({"<p>": torch.randn(1, 32)}, tmp_path / "learned_embeds.bin")
    with pytest.raises(ModelLoadError, match="pickled.*--allow-pickle"):
        load_model_pair(str(tiny_dir / "base"), str(tmp_path / "learned_embeds.bin"),
                        kind="textual_inversion", token="<p>")
    pair = load_model_pair(str(tiny_dir / "base"), str(tmp_path / "learned_embeds.bin"),
                           kind="textual_inversion", token="<p>", allow_pickle=True)
    assert pair.kind == "textual_inversion"


@pytest.mark.parametrize("personalized", ["dreambooth", "lora"])
def test_model_offload_gives_the_same_images(tiny_dir, tmp_path, personalized):
    """`--offload` installs accelerate's hooks on every model; with the CPU as the execution device
    they must leave every path (both stages, inversion, attention control, adapter toggling) unchanged."""
    config = LayoutRetouchConfig(method="V", num_inference_steps=STEPS, vanilla_steps=2, segmenter="none",
                                 inversion_cache_dir=str(tmp_path))

    def run(pipe):
        return pipe("a sks dog in the snow", reference_image=tiny_dir / "reference.png", config=config,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images

    plain_run = run(load(tiny_dir, personalized=personalized))
    offloaded = load(tiny_dir, personalized=personalized)
    offloaded.enable_model_cpu_offload("cpu")
    assert offloaded.execution_device == torch.device("cpu")
    assert all(hasattr(m, "_hf_hook") for m in offloaded.models.unets())
    assert torch.allclose(run(offloaded), plain_run, atol=1e-5)


def test_error_method_needs_reference(tiny_dir):
    pipe = load(tiny_dir, personalized="dreambooth")
    with pytest.raises(LayoutRetouchError, match="reference photo"):
        pipe("a sks dog", config=LayoutRetouchConfig(method="V", num_inference_steps=2))


# --- the CLI end to end
def cli(*args):
    return main([str(a) for a in args])


def test_generate_cli_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the snow\na {} on the beach\n")
    common = ["generate", "--base", tiny_dir / "base", "--personalized", tiny_dir / "dreambooth", "--token", "sks",
              "--class-word", "dog", "--out", out, "--steps", 3, "--method", "II", "--seeds", "1,2", "--quiet"]
    assert cli(*common, "--prompt-file", prompts) == 0
    files = sorted(out.rglob("*.png"))
    assert len(files) == 4
    params = json.loads(files[0].with_suffix(".json").read_text())
    assert params["config"]["method"] == "II" and params["seed"] in (1, 2)
    assert json.loads(Image.open(files[0]).text["parameters"]) == params
    # Existing results are never overwritten silently; resuming skips them.
    assert cli(*common, "--prompt-file", prompts) == 2
    assert "already exist" in capsys.readouterr().err
    before = files[0].stat().st_mtime_ns
    assert cli(*common, "--prompt-file", prompts, "--skip-existing") == 0
    assert files[0].stat().st_mtime_ns == before
    # Fused attention projections: the same images, and said next to them.
    assert cli(*common, "--prompt-file", prompts, "--fuse-qkv", "--out", tmp_path / "fused") == 0  # the last --out
    twin = tmp_path / "fused" / files[0].relative_to(out)
    assert json.loads(twin.with_suffix(".json").read_text())["models"]["fused_qkv_projections"] is True
    difference = np.abs(np.asarray(Image.open(twin), dtype=int) - np.asarray(Image.open(files[0]), dtype=int))
    assert difference.max() <= 1  # float rounding of the fused matmul, at most one level


def test_generate_cli_bad_input(tiny_dir, tmp_path, capsys):
    base = ["generate", "--base", tiny_dir / "base", "--personalized", tiny_dir / "dreambooth", "--token", "sks",
            "--class-word", "dog", "--out", tmp_path, "--steps", 2, "--quiet"]
    assert cli(*base, "--prompt", "a dog") == 2
    assert "does not contain the personal token" in capsys.readouterr().err
    assert cli(*base, "--prompt", "a sks dog") == 2  # method V without a reference
    assert "needs --reference" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert cli(*base, "--prompt", "a sks dog", "--reference", tmp_path / "bad.png") == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    make_photo(tmp_path / "ok.png")
    assert cli(*base, "--prompt", "a sks dog", "--method", "nine") == 2
    assert "unknown method" in capsys.readouterr().err
    lora = ["generate", "--base", tiny_dir / "base", "--personalized", tiny_dir / "lora", "--token", "sks",
            "--class-word", "dog", "--out", tmp_path, "--steps", 2, "--quiet", "--method", "I"]
    assert cli(*lora, "--prompt", "a sks dog", "--fuse-qkv") == 2
    assert "cannot fuse the attention projections of a lora" in capsys.readouterr().err
