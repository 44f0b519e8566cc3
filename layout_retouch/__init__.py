"""Layout-and-Retouch: varied layouts for personalized Stable Diffusion, training-free.

Stage 1 (stage1_layout) lets the vanilla model set the layout; Stage 2 (stage2_retouch) retouches
the subject with the reference's appearance through attention control (attention_control) and an
adaptive mask (masks, segmenters). `LayoutRetouchPipeline` runs both; `LayoutRetouchConfig` holds
every hyperparameter.
"""

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.pipeline import LayoutRetouchOutput, LayoutRetouchPipeline

__all__ = ["LayoutRetouchConfig", "LayoutRetouchOutput", "LayoutRetouchPipeline"]
__version__ = "0.1.0"
