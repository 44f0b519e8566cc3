"""Fine-tune any diffusers Stable Diffusion pipeline on subject photos: DreamBooth, LoRA, Textual Inversion.

    from layout_retouch.personalize import PersonalizeConfig, personalize
    personalize(PersonalizeConfig(method="lora", base="path/to/sd", photos="photos/", output="out/"))
"""

from layout_retouch.personalize.api import PersonalizeResult, personalize
from layout_retouch.personalize.common import METADATA_FILE
from layout_retouch.personalize.config import METHODS, PersonalizeConfig
from layout_retouch.personalize.lora import LORA_WEIGHTS_FILE
from layout_retouch.personalize.textual_inversion import EMBEDS_FILE

__all__ = [
    "EMBEDS_FILE", "LORA_WEIGHTS_FILE", "METADATA_FILE", "METHODS", "PersonalizeConfig", "PersonalizeResult",
    "personalize",
]
