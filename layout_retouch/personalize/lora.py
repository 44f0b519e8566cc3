"""DreamBooth-LoRA: low-rank adapters (peft) on the UNet's attention projections, saved for diffusers."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from layout_retouch.personalize.common import PersonalizationMethod, save_dtype
from layout_retouch.personalize.dreambooth import check_token_known

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for


class DreamBoothLoRA(PersonalizationMethod):
    """Output: `pytorch_lora_weights.safetensors` in the diffusers LoRA format (`pipe.load_lora_weights`)."""

    name = "lora"

    def setup(self) -> dict[str, torch.nn.Parameter]:
        check_token_known(self.pipe.tokenizer, self.config.token)
        self.freeze_all()
        torch.manual_seed(self.config.seed)  # peft draws the down projections from torch's global RNG
        self.pipe.unet.add_adapter(LoraConfig(
            r=self.config.rank, lora_alpha=self.config.lora_alpha, init_lora_weights="gaussian",
            target_modules=list(self.config.lora_target_modules),
        ))
        self.pipe.unet.train()
        return {n: p for n, p in self.pipe.unet.named_parameters() if p.requires_grad}

    def save(self, output: Path) -> None:
        dtype = save_dtype(self.config)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        layers = {k: v.detach().to("cpu", dtype) for k, v in layers.items()}
        StableDiffusionPipeline.save_lora_weights(
            output, unet_lora_layers=layers, weight_name=LORA_WEIGHTS_FILE, safe_serialization=True,
        )
