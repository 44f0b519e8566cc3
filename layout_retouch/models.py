"""Loading the vanilla (base) model and the personalized model as one pair that shares what it can.

Stage 1 alternates between the two models; Stage 2 runs the personalized one. Whatever a
personalization leaves unchanged is shared: Textual Inversion only adds token embeddings, a LoRA is
one UNet whose adapter is switched off for vanilla steps, Custom Diffusion swaps only the
cross-attention key/value weights. Only DreamBooth needs a second UNet (and text encoder, when it
was fine-tuned).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from layout_retouch.architecture import SDXL, Architecture, architecture_of
from layout_retouch.errors import LayoutRetouchError, ModelLoadError

KINDS = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
CD_WEIGHT_SUFFIXES = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
                      "to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight",
                      "to_out_custom_diffusion.0.bias")


@dataclass
class ModelPair:
    """The two models of the method. `select(personalized)` returns the (unet, text_encoder) to call."""

    # the base components (vae, tokenizer(s), scheduler, vanilla unet / text encoder(s)): SD 1.x/2.x or SDXL
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    kind: str | None = None
    token: str | None = None
    class_word: str | None = None
    personal_unet: UNet2DConditionModel | None = None  # DreamBooth only
    personal_text_encoder: torch.nn.Module | None = None  # DreamBooth with a fine-tuned text encoder
    personal_text_encoder_2: torch.nn.Module | None = None  # ... and SDXL's second one
    switch: Callable[[bool], None] | None = None  # toggles a shared UNet (LoRA, Custom Diffusion)
    sources: dict = field(default_factory=dict)  # what was loaded, saved next to outputs
    _state: bool | None = None

    @property
    def one_unet(self) -> bool:
        """Both models run through one UNet with nothing to switch (Textual Inversion): paths share calls."""
        return self.personal_unet is None and self.switch is None

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.pipe.unet)

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2] if self.architecture.text_encoders == 2 \
            else [self.pipe.tokenizer]

    def text_encoders(self, personalized: bool) -> list[torch.nn.Module]:
        """The text encoder(s) of one model (SDXL: two), with a shared one switched accordingly."""
        _, first = self.select(personalized)
        if self.architecture.text_encoders == 1:
            return [first]
        second = self.personal_text_encoder_2 if personalized and self.personal_text_encoder_2 is not None \
            else self.pipe.text_encoder_2
        return [first, second]

    @property
    def scheduler(self) -> DDIMScheduler:
        return self.pipe.scheduler

    def select(self, personalized: bool):
        """The UNet and text encoder of one model, with a shared UNet switched accordingly."""
        if self.switch is not None and self._state is not personalized:
            self.switch(personalized)
            self._state = personalized
        unet = self.personal_unet if personalized and self.personal_unet is not None else self.pipe.unet
        te = (self.personal_text_encoder if personalized and self.personal_text_encoder is not None
              else self.pipe.text_encoder)
        return unet, te

    def unets(self) -> list[UNet2DConditionModel]:
        return [self.pipe.unet] + ([self.personal_unet] if self.personal_unet is not None else [])

    def expand_prompt(self, prompt: str) -> str:
        """Spell a multi-vector Textual Inversion token out as its pieces, as the tokenizer needs."""
        return self.pipe.maybe_convert_prompt(prompt, self.tokenizer)

    def fuse_qkv_projections(self) -> None:
        """Fuse each attention layer's query/key/value projections into one matmul (diffusers' fusion).

        One large matmul instead of three small ones: about 10% fewer operators per SD 1.5 UNet call, which
        is time where a GPU waits for launches. The separate projections become views of the fused weights,
        so memory does not grow (after `to()`, fuse again). A personalization that switches the UNet's
        weights (LoRA, Custom Diffusion) would not reach a fused copy, so it is refused.
        """
        if self.switch is not None:
            raise LayoutRetouchError(
                f"cannot fuse the attention projections of a {self.kind} personalization: it switches the "
                "UNet's own projections, which a fused copy would not follow")
        for unet in {id(u): u for u in self.unets()}.values():
            unet.fuse_qkv_projections()
            for module in unet.modules():
                if getattr(module, "fused_projections", False):
                    _share_fused_weights(module)
        self.sources["fused_qkv_projections"] = True  # saved next to outputs: float rounding may differ

    def to(self, device=None, dtype=None) -> ModelPair:
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.pipe.to(**kwargs)
        for module in (self.personal_unet, self.personal_text_encoder, self.personal_text_encoder_2):
            if module is not None:
                module.to(**kwargs)
        return self


def _share_fused_weights(attn) -> None:
    """Make to_q/to_k/to_v views of the fused projection, so the weights are held once."""
    fused, parts = (attn.to_kv, (attn.to_k, attn.to_v)) if hasattr(attn, "to_kv") else \
        (attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v))
    start = 0
    for part in parts:
        stop = start + part.out_features
        part.weight.data = fused.weight.data[start:stop]
        if part.bias is not None:
            part.bias.data = fused.bias.data[start:stop]
        start = stop


def load_model_pair(
    base: str,
    personalized: str | None = None,
    kind: str | None = None,
    token: str | None = None,
    class_word: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    base_config: str | None = None,
    vae: str | None = None,
) -> ModelPair:
    """Load the base model (SD 1.x/2.x or SDXL) and, if given, its personalization (kind auto-detected when None).

    `vae` replaces the base's VAE (a folder or hub id), e.g. an fp16-fix VAE for SDXL in half precision.
    """
    pipe = load_base(base, torch_dtype, allow_pickle, base_config)
    sources = {"base": str(base), **({"base_config": base_config} if base_config else {})}
    if vae is not None:
        pipe.vae = load_vae(vae, torch_dtype, allow_pickle)
        sources["vae"] = str(vae)
    pair = ModelPair(pipe=pipe, token=token, class_word=class_word, sources=sources)
    if personalized is None:
        return pair
    path = Path(personalized)
    if not path.exists():
        raise ModelLoadError(f"personalized model {personalized!r} does not exist")
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ModelLoadError(f"unknown personalization kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not token:
        raise ModelLoadError("a personalized model needs its token (e.g. --token sks)")
    pair.kind = kind
    pair.sources.update(personalized=str(path), kind=kind, token=token, class_word=class_word)
    LOADERS[kind](pair, path, torch_dtype, allow_pickle)
    check_token_known(pair)
    return pair


# Extra arguments of each supported pipeline class: no safety checker, no watermark (the method's images are
# compared with the plain pipeline's).
PIPELINE_KWARGS = {StableDiffusionPipeline: dict(safety_checker=None, requires_safety_checker=False),
                   StableDiffusionXLPipeline: dict(add_watermarker=False)}


def pipeline_class(class_name: str | None) -> type:
    """SDXL for diffusers' StableDiffusionXL* pipelines, SD 1.x/2.x otherwise."""
    return StableDiffusionXLPipeline if (class_name or "").startswith("StableDiffusionXL") \
        else StableDiffusionPipeline


def _single_file_class(path: Path, base_config: str | None) -> type:
    """An SDXL checkpoint holds its second text encoder under `conditioner.embedders.1`; SD 1.x/2.x's do not."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as opened:
                keys = list(opened.keys())
        except (OSError, ValueError, SafetensorError):
            return StableDiffusionPipeline  # the loader itself says what is wrong with the file
        return StableDiffusionXLPipeline if any(k.startswith("conditioner.embedders.1.") for k in keys) \
            else StableDiffusionPipeline
    return _config_class(base_config) if base_config else StableDiffusionPipeline


def _config_class(name: str) -> type:
    try:
        return pipeline_class(DiffusionPipeline.load_config(name).get("_class_name"))
    except (OSError, ValueError):
        return StableDiffusionPipeline  # the loader itself says what is wrong with `name`


def load_vae(name: str, torch_dtype, allow_pickle: bool) -> AutoencoderKL:
    """A VAE from a folder (its own, or a pipeline's with vae/) or a hub id."""
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
        raise ModelLoadError(f"{name!r} holds no VAE: no config.json in it or in its vae/ folder")
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    try:
        return _from_pretrained(AutoencoderKL, name, allow_pickle, subfolder, torch_dtype=torch_dtype)
    except OSError as err:
        raise ModelLoadError(f"cannot load the VAE {name!r}: {err}") from err


def load_base(base: str, torch_dtype, allow_pickle: bool,
              base_config: str | None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    path = Path(base)
    if path.is_file():
        _check_weights_file(path, allow_pickle)
        cls = _single_file_class(path, base_config)
        try:
            pipe = cls.from_single_file(str(path), config=base_config, torch_dtype=torch_dtype, **PIPELINE_KWARGS[cls])
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
            if (cause := _pickle_cause(err)) is not None:
                raise _pickle_error(path, cause) from None
            raise ModelLoadError(
                f"cannot load the single-file checkpoint {base!r}: {err}. A single file needs the model's "
                "config: pass --base-config with a local diffusers folder (or a hub id where the hub is reachable)"
            ) from err
    elif path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{base!r} is not a diffusers pipeline folder (no model_index.json); give a folder made by "
                "save_pretrained, a single .safetensors checkpoint, or a hub id"
            )
        cls = _config_class(str(path))
        pipe = _from_pretrained(cls, str(path), allow_pickle, torch_dtype=torch_dtype, **PIPELINE_KWARGS[cls])
    elif _looks_like_hub_id(base):
        try:
            cls = _config_class(base)
            pipe = _from_pretrained(cls, base, allow_pickle, torch_dtype=torch_dtype, **PIPELINE_KWARGS[cls])
        except OSError as err:
            raise ModelLoadError(
                f"cannot load {base!r} from the model hub ({err.__class__.__name__}): the hub is unreachable or "
                "the id is wrong. A local diffusers folder or a .safetensors file works offline"
            ) from err
    else:
        raise ModelLoadError(f"base model {base!r} does not exist (not a file, folder or hub id)")
    if isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder is None:
        raise ModelLoadError(f"{base!r} has one text encoder of SDXL's two (an SDXL refiner?): the method needs a "
                             "text-to-image base such as stabilityai/stable-diffusion-xl-base-1.0")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the method is defined on DDIM
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(cls, name: str, allow_pickle: bool, subfolder: str | None = None, **kwargs):
    with warnings.catch_warnings():  # diffusers renames torch_dtype; older releases know only that name
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return _from_pretrained_checked(cls, name, allow_pickle, subfolder, **kwargs)


def _from_pretrained_checked(cls, name: str, allow_pickle: bool, subfolder: str | None, **kwargs):
    try:
        return cls.from_pretrained(name, subfolder=subfolder, use_safetensors=True, **kwargs) if subfolder \
            else cls.from_pretrained(name, use_safetensors=True, **kwargs)
    except OSError as err:
        if not allow_pickle or "safetensors" not in str(err).lower():
            if "safetensors" in str(err).lower():
                raise ModelLoadError(
                    f"{name!r} has no safetensors weights; pickled weights can run code when loaded, so "
                    "they are refused unless you pass --allow-pickle (then loaded with weights_only=True)"
                ) from err
            raise
    # diffusers loads pickled weights with torch.load(weights_only=True).
    extra = {"subfolder": subfolder} if subfolder else {}
    try:
        return cls.from_pretrained(name, use_safetensors=False, **extra, **kwargs)
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        if (cause := _pickle_cause(err)) is None:
            raise ModelLoadError(f"cannot load the pickled weights of {name!r}: {err}") from None
        raise _pickle_error(name, cause) from None


def _pickle_cause(err: BaseException) -> BaseException | None:
    """The unpickling error behind `err`, if any (diffusers wraps torch's in an OSError or ValueError)."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, (pickle.UnpicklingError, EOFError)):
        cause = cause.__cause__ or cause.__context__
    return cause


def _pickle_error(name, err: BaseException) -> ModelLoadError:
    """One line for a pickle refused or unreadable. torch's own message advises weights_only=False,
    which would let the file run code: the opposite of what a user should do."""
    if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
        return ModelLoadError(f"{name}: this pickle holds objects other than tensors; refusing (it could run code "
                              "when loaded); convert the weights to safetensors")
    return ModelLoadError(f"{name}: cannot be read as a torch pickle ({type(err).__name__}): damaged or another format")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _check_weights_file(path: Path, allow_pickle: bool) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickled checkpoint, which can run code when loaded; convert it to safetensors or "
            "pass --allow-pickle to load it with weights_only=True"
        )


def load_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """safetensors always; a pickle only when allowed, and then tensors only (weights_only=True)."""
    _check_weights_file(path, allow_pickle)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with warnings.catch_warnings():  # torch's note on old pickle protocols is no news to the user
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError) as err:
        raise _pickle_error(path, err) from None


def detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix in (".safetensors", *PICKLE_SUFFIXES) and path.stat().st_size < 5_000_000:
            keys = list(load_state_dict(path, allow_pickle=True).keys()) if path.suffix == ".safetensors" \
                else []
            if any(k.startswith("model.diffusion_model.") for k in keys):  # a small full checkpoint
                return "dreambooth"
            if any("lora" in k for k in keys):
                return "lora"
            if any("custom_diffusion" in k for k in keys):
                return "custom_diffusion"
            return "textual_inversion"
        return "dreambooth"
    names = {p.name for p in path.iterdir()}
    if "model_index.json" in names or "unet" in names:
        return "dreambooth"
    if any("custom_diffusion" in n for n in names):
        return "custom_diffusion"
    if any("lora" in n for n in names):
        return "lora"
    if any(n.startswith("learned_embeds") for n in names):
        return "textual_inversion"
    raise ModelLoadError(
        f"cannot tell what kind of personalization {path} holds; pass --personalization "
        f"({', '.join(KINDS)})"
    )


def _weights_file(path: Path, stems: tuple[str, ...], allow_pickle: bool) -> Path:
    if path.is_file():
        return path
    for stem in stems:
        for suffix in (".safetensors", *PICKLE_SUFFIXES):
            candidate = path / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise ModelLoadError(f"no weights file named {' or '.join(stems)}.safetensors in {path}")


def load_dreambooth(pair: ModelPair, path: Path, torch_dtype, allow_pickle: bool) -> None:
    if path.is_file():
        config = pair.sources.get("base_config") or pair.sources["base"]  # a single-file base cannot be the config
        fine_tuned = load_base(str(path), torch_dtype, allow_pickle, base_config=config)
        unet, text_encoder = fine_tuned.unet, fine_tuned.text_encoder
        text_encoder_2 = getattr(fine_tuned, "text_encoder_2", None)
    else:
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        if not (unet_dir / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a DreamBooth folder: no unet/config.json")
        unet = _from_pretrained(UNet2DConditionModel, str(unet_dir), allow_pickle, torch_dtype=torch_dtype)
        text_encoder, text_encoder_2 = (
            _from_pretrained(type(base_encoder), str(path / name), allow_pickle, torch_dtype=torch_dtype)
            if base_encoder is not None and (path / name / "config.json").is_file() else None
            for name, base_encoder in (("text_encoder", pair.pipe.text_encoder),
                                       ("text_encoder_2", getattr(pair.pipe, "text_encoder_2", None))))
    check_same_architecture(pair.pipe.unet, unet, "the DreamBooth UNet")
    pair.personal_unet = unet
    if text_encoder is not None and not _same_weights(text_encoder, pair.pipe.text_encoder):
        pair.personal_text_encoder = text_encoder
    if text_encoder_2 is not None and not _same_weights(text_encoder_2, pair.pipe.text_encoder_2):
        pair.personal_text_encoder_2 = text_encoder_2


def load_textual_inversion(pair: ModelPair, path: Path, torch_dtype, allow_pickle: bool) -> None:
    file = _weights_file(path, ("learned_embeds", pair.token.strip("<>")), allow_pickle)
    state = load_state_dict(file, allow_pickle)
    _add_embedding(pair, state, file)


def _add_embedding(pair: ModelPair, state: dict, file: Path) -> None:
    token = pair.token
    if "clip_l" in state and "clip_g" in state:
        _add_sdxl_embedding(pair, state, file)
        return
    if pair.architecture is SDXL:
        raise ModelLoadError(f"{file} holds one text encoder's embedding, but an SDXL base has two: an SDXL Textual "
                             "Inversion has clip_l and clip_g vectors")
    if token in state:
        embedding = state[token]
    elif "string_to_param" in state or "emb_params" in state:
        embedding = state  # the A1111 layouts name no token; diffusers reads them
    else:
        raise ModelLoadError(f"token {token!r} not found in the embedding {file} (it has {', '.join(state)})")
    if isinstance(embedding, torch.Tensor) and embedding.shape[-1] != pair.pipe.text_encoder.config.hidden_size:
        raise ModelLoadError(
            f"the embedding in {file} has width {embedding.shape[-1]} but the base text encoder "
            f"{pair.pipe.text_encoder.config.hidden_size}: it was trained for another base model"
        )
    try:
        pair.pipe.load_textual_inversion(embedding, token=token)
    except ValueError as err:
        raise ModelLoadError(f"cannot add the embedding of {token!r} from {file}: {err}") from err


def _add_sdxl_embedding(pair: ModelPair, state: dict, file: Path) -> None:
    """SDXL's Textual Inversion: one vector set per text encoder (clip_l for the first, clip_g for the second)."""
    if pair.architecture is not SDXL:
        raise ModelLoadError(f"{file} is an SDXL embedding (clip_l and clip_g vectors) but the base has one text "
                             "encoder: load it on an SDXL base")
    pipe = pair.pipe
    for name, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                     ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        vectors = state[name]
        if vectors.shape[-1] != encoder.config.hidden_size:
            raise ModelLoadError(f"the {name} vectors in {file} have width {vectors.shape[-1]} but that text encoder "
                                 f"{encoder.config.hidden_size}: it was trained for another base model")
        try:
            pipe.load_textual_inversion(vectors, token=pair.token, text_encoder=encoder, tokenizer=tokenizer)
        except ValueError as err:
            raise ModelLoadError(f"cannot add the {name} embedding of {pair.token!r} from {file}: {err}") from err


# Text widths of the bases a LoRA's cross-attention keys can be made for (what its name says to a user).
TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# A cross-attention key projection's down (A) weight, with "_" read as ".": attn2.to.k.lora.A (PEFT),
# attn2.processor.to.k.lora.down (diffusers' older names), attn2.to.k.lora.down (kohya).
_LORA_TEXT_KEY = re.compile(r"attn2\.(processor\.)?to\.k\.lora\.(A|down)\.")


def lora_text_width(state: dict[str, torch.Tensor]) -> int | None:
    """The text width a LoRA's cross-attention key projections take (diffusers', PEFT's or kohya's names)."""
    for key, value in state.items():
        if _LORA_TEXT_KEY.search(key.replace("_", ".")) and value.ndim == 2:
            return int(value.shape[1])
    return None


def check_lora_fits(pair: ModelPair, state: dict[str, torch.Tensor], file: Path) -> None:
    """An SDXL LoRA on an SD 1.x base (or the reverse) in one line, instead of PEFT's skipped keys or shape errors."""
    base = int(pair.pipe.unet.config.cross_attention_dim)
    width = lora_text_width(state)
    second = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in state)
    if width is not None and width != base:
        made_for = TEXT_WIDTHS.get(width, f"a base of text width {width}")
        raise ModelLoadError(f"the LoRA {file} was made for {made_for} (text width {width}) but the base is "
                             f"{TEXT_WIDTHS.get(base, pair.architecture.label)} (text width {base}): load it on the "
                             "base it was trained from")
    if second and pair.architecture is not SDXL:
        raise ModelLoadError(f"the LoRA {file} was made for SDXL (it adapts a second text encoder) but the base has "
                             "one text encoder: load it on the base it was trained from")


def load_lora(pair: ModelPair, path: Path, torch_dtype, allow_pickle: bool) -> None:
    file = _weights_file(path, ("pytorch_lora_weights",), allow_pickle)
    state = load_state_dict(file, allow_pickle)
    check_lora_fits(pair, state, file)
    try:
        pair.pipe.load_lora_weights(state, adapter_name="personal")
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"cannot apply the LoRA {file} to the base model: {err}") from err

    def switch(personalized: bool) -> None:
        (pair.pipe.enable_lora if personalized else pair.pipe.disable_lora)()

    pair.switch = switch


def load_custom_diffusion(pair: ModelPair, path: Path, torch_dtype, allow_pickle: bool) -> None:
    """Merge the fine-tuned attention projections into the UNet's own, behind a switch.

    Custom Diffusion fine-tunes the cross-attention key/value projections (and adds a token). Putting
    them into the plain `to_k`/`to_v` modules, instead of a Custom Diffusion attention processor, lets
    any attention processor, ours included, run on top of them.
    """
    file = _weights_file(path, ("pytorch_custom_diffusion_weights",), allow_pickle)
    state = load_state_dict(file, allow_pickle)
    unet = pair.pipe.unet
    params = dict(unet.named_parameters())
    swaps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state.items():
        layer, _, rest = key.partition(".processor.")
        rest = rest.replace("_custom_diffusion", "")
        name = f"{layer}.{rest}"
        if name not in params:
            raise ModelLoadError(f"{file}: {key} names no parameter of the base UNet ({name})")
        if params[name].shape != value.shape:
            raise ModelLoadError(
                f"{file}: {key} has shape {tuple(value.shape)} but the base UNet's {name} has "
                f"{tuple(params[name].shape)}: it was trained for another base model"
            )
        swaps[name] = (params[name].data, value.to(params[name].device, params[name].dtype))
    if not swaps:
        raise ModelLoadError(f"{file} holds no Custom Diffusion weights")

    def switch(personalized: bool) -> None:
        for name, (vanilla, personal) in swaps.items():
            params[name].data = personal if personalized else vanilla

    pair.switch = switch
    embeddings = [p for p in sorted(path.glob("*.safetensors")) if p != file] if path.is_dir() else []
    for emb in embeddings:
        _add_embedding(pair, load_file(str(emb)), emb)


LOADERS = {
    "dreambooth": load_dreambooth,
    "lora": load_lora,
    "textual_inversion": load_textual_inversion,
    "custom_diffusion": load_custom_diffusion,
}


def check_same_architecture(base: torch.nn.Module, other: torch.nn.Module, what: str) -> None:
    keys = ("block_out_channels", "cross_attention_dim", "down_block_types", "up_block_types",
            "in_channels", "attention_head_dim", "layers_per_block", "sample_size")
    a, b = base.config, other.config
    diffs = [k for k in keys if json.dumps(a.get(k)) != json.dumps(b.get(k))]
    if diffs:
        detail = "; ".join(f"{k}: base {a.get(k)} vs {b.get(k)}" for k in diffs)
        raise ModelLoadError(f"{what} does not match the base model ({detail}): was it trained from another base?")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def check_token_known(pair: ModelPair) -> None:
    """The personal token must be a word the tokenizer knows, or the personalized model never sees it."""
    tok = pair.tokenizer
    ids = tok(pair.expand_prompt(pair.token), add_special_tokens=False).input_ids
    if not ids or (tok.unk_token_id is not None and tok.unk_token_id in ids
                   and tok.unk_token_id != tok.eos_token_id):
        raise ModelLoadError(
            f"token {pair.token!r} is not in the tokenizer's vocabulary; check --token against the "
            "personalized model (DreamBooth's rare word, or the Textual Inversion placeholder)"
        )
