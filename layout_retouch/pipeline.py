"""`LayoutRetouchPipeline`: the paper's two stages, top to bottom, in diffusers' style."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from layout_retouch.architecture import SDXL, default_config
from layout_retouch.attention_control import (
    LAYOUT,
    REFERENCE,
    TARGET,
    AttentionController,
    ControlPlan,
    build_plan,
)
from layout_retouch.conditioning import PromptEncoder
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.inversion import (
    DDIMInversion,
    InversionCache,
    InversionLatents,
    InversionTrajectory,
    ddim_invert,
    encode_image,
    load_reference_image,
    model_fingerprint,
)
from layout_retouch.layers import attention_layers, select_map_layers
from layout_retouch.masks import box_and_peak, resize_mask
from layout_retouch.models import ModelPair, load_model_pair
from layout_retouch.progress import Progress
from layout_retouch.prompts import SubjectPrompts, derive_prompts, subject_token_indices
from layout_retouch.sampling import Conditioning, attention_control
from layout_retouch.segmenters import load_segmenter
from layout_retouch.source_features import (
    LayoutRecorder,
    ReferenceFeatureCache,
    ReferenceRecorder,
    SourceFeatures,
    feature_homes,
    fits,
    layout_feature_bytes,
    reference_feature_bytes,
    tensor_digest,
    weights_signature,
)
from layout_retouch.stage1_layout import LayoutTrajectory, step_blended_denoise
from layout_retouch.stage2_retouch import MaskBuilder, Retouch, RetouchConditioning
from layout_retouch.vae import vae_precision


class Deferred:
    """A value made when first read (`DeferredField`): a VAE decode that most callers never look at."""

    def __init__(self, make):
        self.make = make


class DeferredField:
    """A dataclass field whose value may be `Deferred`: made on the first read, then kept like any value.

    Its default is None (a dataclass takes a descriptor field's default from `__get__` on the class). Only for
    fields that are None when the output is built: BaseOutput's dict holds the fields that were not None then,
    and a value assigned later stays an attribute, as a plain field's would.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        value = obj.__dict__.get(self.slot)
        if isinstance(value, Deferred):
            value = obj.__dict__[self.slot] = value.make()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class LayoutRetouchOutput(BaseOutput):
    images: list  # the result (PIL images, or an array / tensor per output_type)
    layout_images: list | None  # Stage 1's output I_l (None for ablation III)
    prompts: SubjectPrompts | None
    config: dict
    trajectory: LayoutTrajectory | None = None
    reference_image: Image.Image | None = None  # the reference as the model saw it (resized, cropped)
    # VAE decode of its inverted clean latent (with config.defer_reference_reconstruction: on first read)
    reference_reconstruction: Image.Image | None = DeferredField()
    masks: dict = field(default_factory=dict)  # name -> (n, H_lat, W_lat) arrays: m_ca, m_sam, union, final
    attention_maps: dict = field(default_factory=dict)  # role -> (steps, n, h, w) subject maps

    def __reduce__(self):
        self.reference_reconstruction  # noqa: B018 (made now: a pickle or copy holds the image, not the pipeline)
        return super().__reduce__()


@dataclass
class PendingInversion:
    """A reference inversion still to run, where its result is cached, and how many latents are on disk."""

    steps: DDIMInversion
    cache: InversionCache
    key: str
    saved: int = 0


class LayoutRetouchPipeline:
    """Layout-and-Retouch on a vanilla / personalized model pair (see ALGORITHM.md)."""

    def __init__(self, models: ModelPair, config: LayoutRetouchConfig | None = None, progress: Progress = True):
        self.models = models
        self.config = config or default_config(models.architecture)  # the layer rules of SD 1.x/2.x or SDXL
        self.progress = progress  # tqdm bars, none, or a callback per step (layout_retouch/progress.py)
        self._segmenters: dict = {}
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, base: str, personalized: str | None = None, personalization: str | None = None,
                        token: str | None = None, class_word: str | None = None,
                        torch_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                        base_config: str | None = None, config: LayoutRetouchConfig | None = None,
                        device: str | torch.device | None = None, vae: str | None = None,
                        **kwargs) -> LayoutRetouchPipeline:
        """Load `base` (SD 1.x/2.x or SDXL: hub id, diffusers folder or single file) and its personalization.

        `vae` replaces the base's VAE (folder or hub id): an fp16-fix VAE lets SDXL's VAE run in fp16.
        """
        models = load_model_pair(base, personalized, personalization, token, class_word, torch_dtype,
                                 allow_pickle, base_config, vae)
        pipe = cls(models, config, **kwargs)
        return pipe.to(device) if device is not None else pipe

    # --- diffusers-style conveniences
    @property
    def device(self) -> torch.device:
        return self.models.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.models.pipe.unet.dtype

    def to(self, device=None, dtype=None) -> LayoutRetouchPipeline:
        self.models.to(device, dtype)
        return self

    def fuse_qkv_projections(self) -> None:
        """One matmul per attention layer for its query/key/value (ModelPair.fuse_qkv_projections); after `to()`."""
        self.models.fuse_qkv_projections()

    def compile_unets(self, mode: bool | str | None = None) -> None:
        """torch.compile every UNet in place (once per mode; True, None or "default": torch's default mode).

        The method's attention processor is left out of the graphs (it runs eagerly, see
        LayoutRetouchAttnProcessor.__call__); diffusers' processors (plain sampling) are compiled with the rest.
        """
        mode = None if mode in (None, True, "default") else mode
        if getattr(self, "_compiled", ()) == (mode,):
            return
        for unet in {id(u): u for u in self.models.unets()}.values():
            unet.compile(mode=mode)
        self._compiled = (mode,)

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep each model on the CPU until it runs (for GPUs with little memory), via accelerate."""
        from accelerate import cpu_offload_with_hook

        hook = None
        models = self.models
        modules = [models.pipe.text_encoder, models.personal_text_encoder, getattr(models.pipe, "text_encoder_2", None),
                   models.personal_text_encoder_2, *models.unets(), models.pipe.vae]
        for module in dict.fromkeys(m for m in modules if m is not None):
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
        self._execution_device = torch.device(device)

    @property
    def execution_device(self) -> torch.device:
        return getattr(self, "_execution_device", self.device)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.models.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        side = self.models.pipe.unet.config.sample_size * self.vae_scale_factor
        return (self.config.height or side, self.config.width or side)

    # --- the method
    @torch.no_grad()
    def __call__(self, prompt: str, reference_image=None, config: LayoutRetouchConfig | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 save_intermediates: bool = False, **overrides) -> LayoutRetouchOutput:
        config = (config or self.config).replace(**overrides) if overrides else (config or self.config)
        if config.compile_unet:
            self.compile_unets(config.compile_unet)
        models = self.models
        n = num_images_per_prompt
        height, width = config.height or self.default_size()[0], config.width or self.default_size()[1]
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if config.uses_reference and reference_image is None:
            raise LayoutRetouchError(
                f"method {config.method} borrows the subject's appearance from a reference photo: pass "
                "reference_image (CLI: --reference), or choose --method I or II"
            )

        if config.is_baseline and models.architecture is SDXL:
            raise LayoutRetouchError(f"the {config.method} baseline runs on SD 1.x/2.x bases only, not on SDXL; "
                                     "choose --method I-V")
        prompts = self.derive_prompts(prompt)
        cond = self.encode_prompts(prompts, None if config.is_baseline else config, (height, width))
        scheduler = models.scheduler
        scheduler.set_timesteps(config.num_inference_steps, device=self.execution_device)
        timesteps = scheduler.timesteps
        if latents is None:
            shape = (n, models.pipe.unet.config.in_channels, *latent_size)
            latents = randn_tensor(shape, generator=generator, device=self.execution_device, dtype=self.dtype)
            latents = latents * scheduler.init_noise_sigma
        if config.is_baseline:  # the paper's baselines: the same noise, prompts and models (baselines/)
            from layout_retouch.baselines import run_baseline

            result = run_baseline(self, config, cond, latents, timesteps, reference_image, (height, width))
            return LayoutRetouchOutput(images=self.decode(result, output_type), layout_images=None, prompts=prompts,
                                       config=config.to_dict())

        # The reference photo, inverted now if cached, else alongside Stage 1 (its calls carry the steps).
        ref_image = reference = inversion = None
        if config.uses_reference:
            ref_image = load_reference_image(reference_image, (height, width))
            reference, inversion = self.start_reference_inversion(ref_image, timesteps, config)
        # the inversion's steps, where they ride in the stages' UNet calls (config.share_inversion_calls)
        shared_inversion = inversion.steps if inversion is not None and config.share_inversion_calls else None

        # Stage 1: the layout (the result itself for ablations I and II).
        plan = None
        if config.uses_reference:
            plan = build_plan(config, models.pipe.unet, swap_layout=config.uses_layout_path, swap_reference=True,
                              blend=config.uses_mask_blending)
        homes = self.feature_homes(config, plan, latent_size, n)
        feature_plan = None  # the reference features' key and first step, worked out once per call
        if config.uses_reference:
            reference_key = inversion.key if inversion is not None else \
                reference.key or tensor_digest(*reference.latents)
            feature_plan = self.reference_feature_plan(config, plan, cond.neutral, reference_key, timesteps,
                                                       latent_size, save_intermediates, homes[0])
        if inversion is not None and config.truncate_inversion:  # only as deep as this call reads it
            inversion.steps.stop = self.reference_reads_from(feature_plan, timesteps)
        layout_features = self.layout_feature_recorder(config, plan, latent_size, n, homes[1])
        layout_recorder = None
        if config.uses_mask_blending or save_intermediates or layout_features is not None:
            layers = attention_layers(models.pipe.unet)
            map_layers = select_map_layers(layers, config.mask_attention_resolution) \
                if config.uses_mask_blending or save_intermediates else set()
            layout_recorder = AttentionController(ControlPlan(map_layers=map_layers,
                                                              batch_maps=config.batch_subject_maps),
                                                  latent_size=latent_size,
                                                  keep_map_history=save_intermediates)
            layout_recorder.recorder = layout_features

        def prepare_retouch(layout: LayoutTrajectory | None) -> tuple[Retouch, ReferenceRecorder | None]:
            """Stage 2's controller, recorded sources and run (before Stage 1 where Stage 2 rides in its calls)."""
            nonlocal reference
            if shared_inversion is not None:  # the steps Stage 1 does not carry ride
                # in Stage 2's calls (or in calls of their own where the reference reads first)
                reference = InversionTrajectory(InversionLatents(shared_inversion, models.select(True)[0]),
                                                timesteps, inversion.key)
            elif inversion is not None:
                reference = self.finish_reference_inversion(inversion)
            controller = AttentionController(plan, latent_size=latent_size, keep_map_history=save_intermediates)
            if layout_features is not None:
                controller.features[LAYOUT] = layout_features.features
            reference_features, reference_recorder = self.reference_features(feature_plan, plan, homes[0])
            if reference_features is not None:
                controller.features[REFERENCE] = reference_features
            controller.recorder = reference_recorder
            run = Retouch(models, config, controller, cond, latents.clone(), timesteps, layout, reference,
                          self.progress, reference_from=reference_recorder.start if reference_recorder else 0,
                          inversion=shared_inversion, uses_layout=config.uses_layout_path)
            return run, reference_recorder

        # Stage 2's steps before S_mask ride in Stage 1's calls (config.pipeline_stages; Retouch.ride says which).
        stage2 = reference_recorder = None
        if config.pipeline_stages and config.uses_layout_path and config.layout_source == "replay":
            stage2, reference_recorder = prepare_retouch(None)
            if layout_recorder is None:  # its processors serve both stages' rows
                layout_recorder = AttentionController(ControlPlan(batch_maps=config.batch_subject_maps),
                                                      latent_size=latent_size)
        trajectory = None
        if config.method != "III":
            with attention_control(models.unets(), layout_recorder):
                trajectory = step_blended_denoise(
                    models, latents, timesteps, config.num_vanilla_steps, cond.vanilla, cond.personalized,
                    config.guidance_scale, config.eta, layout_recorder, self.progress,
                    shared_inversion, rider=stage2)
        layout_images = self.decode(trajectory.latents[-1], "pil") if trajectory is not None else None
        output = LayoutRetouchOutput(images=[], layout_images=layout_images, prompts=prompts,
                                     config=config.to_dict(), trajectory=trajectory)
        if layout_recorder is not None and layout_recorder.history is not None:
            output.attention_maps[LAYOUT] = torch.stack(layout_recorder.history.get(LAYOUT, [])).numpy() \
                if layout_recorder.history.get(LAYOUT) else None
        if not config.uses_reference:
            output.images = self.decode(trajectory.latents[-1], output_type)
            return output

        # Stage 2: retouch with the reference's appearance.
        layout = None
        if config.uses_layout_path:
            layout = trajectory if config.layout_source == "replay" else self.invert_layout(trajectory, timesteps)
        if stage2 is None:
            stage2, reference_recorder = prepare_retouch(layout)
        stage2.layout = layout
        controller = stage2.controller
        output.reference_image = ref_image
        clean = reference.latents[-1]
        output.reference_reconstruction = Deferred(lambda: self.reconstruct(clean)) \
            if config.defer_reference_reconstruction else self.reconstruct(clean)
        masks = None
        if config.uses_mask_blending:
            sam = self.segment_layouts(layout_images, layout_recorder.run_map(LAYOUT), latent_size, config)
            masks = MaskBuilder(sam, config, latent_size)
            controller.blend_mask_fn = masks
        with attention_control(models.unets(), controller):
            result = stage2.run()
        if inversion is not None:  # done by now where it rode (Stage 2 has a call of its own per step beside a
            # vanilla-model step at least), else its last steps alone; cached on disk with any latent read beyond
            self.finish_reference_inversion(inversion)
        if layout_features is not None and config.release_used_features:  # not held through the decode
            layout_features.features.entries.clear()
        if reference_recorder is not None:  # recorded in this Stage 2: every later prompt and seed reuses it
            if save_intermediates:
                reference_recorder.features.maps = controller.history.get(REFERENCE, [])
            self._reference_cache.keep(reference_recorder.key, reference_recorder.features)
        output.images = self.decode(result, output_type)
        if masks is not None and masks.last:
            for name in ("m_ca", "m_sam", "cleaned", "union", "final"):
                output.masks[name] = np.stack([getattr(m, name) for m in masks.last])
        if controller.history is not None:
            reference_features = controller.features.get(REFERENCE)
            if reference_features is not None and reference_features.maps:
                controller.history[REFERENCE] = reference_features.maps
            for role in (REFERENCE, TARGET):
                if controller.history.get(role):
                    output.attention_maps[role] = torch.stack(controller.history[role]).numpy()
        return output

    # --- recorded sources (source_features.py): the same images, less recomputation
    def clear_feature_cache(self) -> None:
        """Forget the cached reference features (they are also invalidated automatically)."""
        self._reference_cache.clear()

    @property
    def _reference_cache(self) -> ReferenceFeatureCache:
        if not hasattr(self, "_reference_feature_cache"):
            self._reference_feature_cache = ReferenceFeatureCache()
        return self._reference_feature_cache

    def feature_homes(self, config: LayoutRetouchConfig, plan: ControlPlan | None, latent_size: tuple[int, int],
                      images: int) -> tuple[torch.device | None, torch.device | None]:
        """Where this call's recorded reference and layout features wait (source_features.feature_homes)."""
        if plan is None:
            return None, None
        unet, element = self.models.pipe.unet, torch.empty((), dtype=self.dtype).element_size()
        cached = self._reference_cache.features
        if cached is not None:  # what the cache already holds on the device (it is replaced if stale)
            reference = 0 if cached.store_device is not None else cached.nbytes
        else:
            reference = reference_feature_bytes(plan, unet, latent_size, config.num_inference_steps, element)
        layout = layout_feature_bytes(plan, unet, latent_size, config.num_inference_steps, images, element)
        return feature_homes(config.feature_offload, self.execution_device, reference, layout,
                             config.device_feature_budget_mb)

    def layout_feature_recorder(self, config: LayoutRetouchConfig, plan: ControlPlan | None,
                                latent_size: tuple[int, int], images: int,
                                home: torch.device | None = None) -> LayoutRecorder | None:
        """A recorder for Stage 1 when Stage 2 will replay its trajectory and the features fit the budget."""
        if plan is None or not (config.uses_layout_path and config.record_layout_features
                                and config.layout_source == "replay"):
            return None
        size = layout_feature_bytes(plan, self.models.pipe.unet, latent_size, config.num_inference_steps, images,
                                    torch.empty((), dtype=self.dtype).element_size())
        if not fits(size, config.layout_feature_budget_mb):
            return None
        return LayoutRecorder(plan, home, release=config.release_used_features)

    def reference_features(self, planned: tuple[str, int] | None, plan: ControlPlan,
                           home: torch.device | None = None) -> tuple[SourceFeatures | None, ReferenceRecorder | None]:
        """The reference path's K/V per step and layer: cached once per concept, or a recorder to fill the cache.

        On a miss the reference runs inside this call's Stage 2 (from S_ref, or the step before where that
        lends its subject map: `reference_start`) and the recorder keeps what later calls need, so no separate
        pass runs. `planned`: `reference_feature_plan`'s key and first step (None: not cached).
        """
        if planned is None:
            return None, None
        key, start = planned
        found = self._reference_cache.lookup(key)
        if found is not None:
            return found, None
        return None, ReferenceRecorder(plan, home, key, start)

    def reference_feature_plan(self, config: LayoutRetouchConfig, plan: ControlPlan, neutral: Conditioning,
                               reference_key: str, timesteps: torch.Tensor, latent_size: tuple[int, int],
                               with_maps: bool = False, home: torch.device | None = None) -> tuple[str, int] | None:
        """The reference features' cache key and the first step the reference path runs for them, or None
        where they are not cached (switched off, no reference swap, over budget).

        The key covers everything they depend on: the personalized UNet's weights, the reference's inversion
        (`reference_key`, the inversion cache's key of its photo, size, schedule, prompt and models: the latents
        may not all exist yet), the neutral prompt's embeddings and subject tokens, the plan's steps and layers,
        dtype, device and where they are kept.
        """
        if not config.cache_reference_features or plan.ref_start is None:
            return None
        unet, _ = self.models.select(True)
        element = torch.empty((), dtype=self.dtype).element_size()  # the inverted latents' dtype
        size = reference_feature_bytes(plan, unet, latent_size, len(timesteps), element)
        if not fits(size, config.reference_feature_budget_mb):
            return None
        start = 0 if with_maps else reference_start(plan, unet)
        key = "|".join([
            weights_signature(unet), reference_key, tensor_digest(*neutral.tensors()),
            str([int(t) for t in timesteps]), str(neutral.tokens), str(latent_size), str(start),
            str(sorted(plan.ref_layers)), str(sorted(plan.map_layers)), str(plan.ref_start),
            str((plan.ref_subject_only, plan.ref_mask_threshold)), str(self.dtype), str(self.execution_device),
            str(home),
        ])
        return key, start

    def reference_reads_from(self, planned: tuple[str, int] | None, timesteps: torch.Tensor) -> int:
        """The first step whose inverted reference latent this call's Stage 2 reads (`Retouch.paths`), given
        `reference_feature_plan`'s answer: where the reference features are cached, none (len(timesteps): the
        clean latent only); where they are recorded, the recorder's start; else every step. The inversion need
        not go deeper (config.truncate_inversion)."""
        if planned is None:
            return 0
        key, start = planned
        return len(timesteps) if self._reference_cache.lookup(key) is not None else start

    @torch.no_grad()  # also when read from an output after the call
    def reconstruct(self, clean: torch.Tensor) -> Image.Image:
        """VAE decode of a reference's clean latent, kept once per concept (and VAE weights)."""
        cache = self._reference_cache
        key = tensor_digest(clean) + weights_signature(self.models.vae)
        if cache.reconstruction_key != key:
            cache.reconstruction, cache.reconstruction_key = self.decode(clean, "pil")[0], key
        return cache.reconstruction.copy()

    # --- the pieces, each usable alone
    def derive_prompts(self, prompt: str) -> SubjectPrompts:
        if self.models.token is None:
            return SubjectPrompts(prompt, prompt, prompt)
        if not self.models.class_word:
            raise LayoutRetouchError("a class word is needed with a personal token (e.g. --class-word dog)")
        return derive_prompts(prompt, self.models.token, self.models.class_word)

    def encode_prompts(self, prompts: SubjectPrompts, config: LayoutRetouchConfig | None = None,
                       size: tuple[int, int] | None = None) -> RetouchConditioning:
        """Each prompt through its model's text encoder(s); with a config, only the prompts that run reads.

        The empty prompt (the unconditional half) is encoded once per text encoder and switch state. `size`
        (height, width; default: the pipeline's) is the image's, which SDXL's time ids carry.
        """
        models = self.models
        token = models.expand_prompt(models.token) if models.token else None
        subject = [w for w in (token, models.class_word) if w]
        encoder = PromptEncoder(models, size or self.default_size())

        def encode(text: str, personalized: bool) -> Conditioning:
            text = models.expand_prompt(text)
            return encoder.guided(text, personalized, subject_token_indices(models.tokenizer, text, subject))

        return RetouchConditioning(
            vanilla=encode(prompts.vanilla, False) if config is None or config.num_vanilla_steps else None,
            personalized=encode(prompts.personalized, True),
            neutral=encode(prompts.neutral, True) if config is None or config.uses_reference else None)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        vae = self.models.vae
        with vae_precision(vae, self.models.architecture) as dtype:
            images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def invert_reference(self, image: Image.Image, timesteps: torch.Tensor,
                         config: LayoutRetouchConfig) -> InversionTrajectory:
        """DDIM-invert the reference on the personalized model, through the on-disk cache."""
        reference, inversion = self.start_reference_inversion(image, timesteps, config)
        return reference if inversion is None else self.finish_reference_inversion(inversion)

    def start_reference_inversion(self, image: Image.Image, timesteps: torch.Tensor, config: LayoutRetouchConfig
                                  ) -> tuple[InversionTrajectory | None, PendingInversion | None]:
        """The cached inversion of the reference, or one to run (with the cache and key it goes to)."""
        models = self.models
        unet, _ = models.select(True)
        cache = InversionCache(config.inversion_cache_dir)
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(unet) + model_fingerprint(models.vae)
        prompt = PromptEncoder(models, (image.height, image.width)).unguided(config.inversion_prompt)
        key = cache.key(self._fingerprint, image, timesteps, config.inversion_prompt, models.scheduler.config,
                        prompt.added)
        cached = cache.load(key, self.execution_device, self.dtype)
        if cached is not None:
            return cached, None
        partial = cache.load_partial(key, self.execution_device, self.dtype)  # a truncated one goes on from there
        if partial is not None:
            inversion = DDIMInversion(models.scheduler, partial[0], timesteps, prompt.cond, prompt.added, partial)
            return None, PendingInversion(inversion, cache, key, saved=len(partial))
        latent = encode_image(models.vae, image, models.architecture).to(self.dtype)
        inversion = DDIMInversion(models.scheduler, latent, timesteps, prompt.cond, prompt.added)
        return None, PendingInversion(inversion, cache, key)

    def finish_reference_inversion(self, pending: PendingInversion) -> InversionTrajectory:
        """Take the inversion's remaining steps down to its `stop` (all of them if nothing carried it) and cache
        the latents inverted so far, where there are more than the disk holds."""
        unet, _ = self.models.select(True)
        trajectory = pending.steps.run(unet, self.progress)
        trajectory.key = pending.key
        if len(pending.steps.states) > pending.saved:
            pending.cache.save(pending.key, trajectory)
            pending.saved = len(pending.steps.states)
        return trajectory

    def invert_layout(self, trajectory: LayoutTrajectory, timesteps: torch.Tensor) -> LayoutTrajectory:
        """The paper's possible alternative to replay: DDIM-invert the decoded layout image."""
        unet, _ = self.models.select(True)
        images = self.decode(trajectory.latents[-1], "pil")
        prompt = PromptEncoder(self.models, (images[0].height, images[0].width)).unguided("")
        latent = torch.cat([encode_image(self.models.vae, im, self.models.architecture) for im in images])
        added = None if prompt.added is None else {k: v.expand(len(images), -1) for k, v in prompt.added.items()}
        inverted = ddim_invert(unet, self.models.scheduler, latent.to(self.dtype), timesteps,
                               prompt.cond.expand(len(images), -1, -1), self.progress, added)
        return LayoutTrajectory(inverted.latents, timesteps, trajectory.vanilla_steps)

    def segment_layouts(self, images: list[Image.Image], subject_maps: torch.Tensor | None,
                        latent_size: tuple[int, int], config: LayoutRetouchConfig) -> np.ndarray:
        """M_sam per layout image, prompted with the box and peak of its subject cross-attention."""
        if config.segmenter not in self._segmenters:
            model_id = config.sam_model if config.segmenter == "sam" else None
            self._segmenters[config.segmenter] = load_segmenter(config.segmenter, model_id, self.execution_device)
        segmenter = self._segmenters[config.segmenter]
        masks = []
        for i, image in enumerate(images):
            if subject_maps is None:
                masks.append(np.zeros(latent_size, dtype=bool))
                continue
            attention = subject_maps[i].cpu().numpy()
            (x0, y0, x1, y1), (px, py) = box_and_peak(attention, config.tau)
            sx, sy = image.width / attention.shape[1], image.height / attention.shape[0]
            mask = segmenter(image, (x0 * sx, y0 * sy, x1 * sx, y1 * sy), (px * sx, py * sy))
            small = resize_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None], latent_size)[0]
            masks.append((small > 0.5).numpy())
        return np.stack(masks)


def reference_start(plan: ControlPlan, unet) -> int:
    """The first step at which the reference path must run for the steps that borrow from it (S_ref on).

    At S_ref its keys are restricted to its subject by its subject map of the step so far (the map layers
    already run in that call), or of the step before where no map layer runs before the first reference
    layer (then the reference runs from S_ref - 1 too). In SD 1.x/2.x, SDXL and the test UNets the map layers
    come first, so the step before is not needed: the same keys, two rows fewer per concept.
    """
    order = [layer.name for layer in attention_layers(unet)]
    maps = [i for i, name in enumerate(order) if name in plan.map_layers]
    refs = [i for i, name in enumerate(order) if name in plan.ref_layers]
    if not plan.ref_subject_only or not maps or not refs or min(maps) < min(refs):
        return plan.ref_start
    return max(0, plan.ref_start - 1)


def load_pipeline_from_args(args) -> LayoutRetouchPipeline:
    """Build a pipeline from the CLI's model options (shared by every command that generates)."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = LayoutRetouchPipeline.from_pretrained(
        args.base, personalized=args.personalized, personalization=args.personalization, token=args.token,
        class_word=args.class_word, torch_dtype=dtype, allow_pickle=args.allow_pickle,
        base_config=args.base_config, vae=getattr(args, "vae", None),
    )
    if getattr(args, "offload", False):
        pipe.enable_model_cpu_offload(args.device)
    else:
        pipe.to(args.device)
    if getattr(args, "fuse_qkv", False):
        pipe.fuse_qkv_projections()
    if getattr(args, "compile", None):
        pipe.compile_unets(args.compile)
    return pipe

