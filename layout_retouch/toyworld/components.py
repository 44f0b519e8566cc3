"""The toy world's model components, built from configs: a tiny SD 1.x in miniature.

Same classes as Stable Diffusion (AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDIM),
only smaller: 64x64 images, 16x16x4 latents, a 2-layer text encoder. The UNet has attention at
8x8 and 4x4, i.e. 1/2 and 1/4 of the latent side, where the method reads its cross-attention
maps (as it does at 32x32 and 16x16 on SD's 64x64 latents), and in its last decoder block at the
full 16x16, where Stage 2 swaps and blends (the decoder's self-attention at 1/2 and 1/1 of the latent
side, SD 1.x's 32x32 and 64x64 up blocks). The encoder has no 16x16 attention: it made a training
step about 1.4x slower here.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from layout_retouch.toyworld.tokenizer import MAX_LENGTH

TEXT_HIDDEN = 128  # text encoder width = UNet cross_attention_dim
# SD 1.x noise schedule, so the method's step and timestep settings mean the same thing here.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_vae(factor: int = 4) -> AutoencoderKL:
    """64x64x3 -> 16x16x4 (factor 4: the shipped 0.92M-parameter VAE) or 32x32x4 (factor 2).

    Factor 2 gives the 32x32 latent that issue 14 asks to try: at 16x16 a 3x3 convolution two levels down
    already sees the whole image, so a UNet never has to route structure through self-attention.
    """
    levels = {4: 3, 2: 2}[factor]
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(32, 64, 64)[:levels], layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=64,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(full_res_decoder_attention: bool = True) -> UNet2DConditionModel:
    """The first toy world's UNet (v1, shipped before v2); `full_res_decoder_attention=False` is its first
    layout (no attention at 16x16), which it was grown from (train_vanilla.py --grow-from)."""
    last_up = "CrossAttnUpBlock2D" if full_res_decoder_attention else "UpBlock2D"
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(4, 8, 8),  # diffusers' name; it is the number of heads per block
        norm_num_groups=16,
    )


def build_unet_v2() -> UNet2DConditionModel:
    """Toy world v2's UNet: self- and cross-attention in every block, the full 16x16 latent included.

    The first layout has no encoder attention at 16x16 and its 16x16 decoder attention was grown late,
    so structure and scene reached the output through convolutions and cross-attention alone; Stage 2
    acts on self-attention, as Stable Diffusion's own attention-swap methods do, and needs a UNet that
    routes structure through it (issue 14). Same widths as the first layout: 7.0M parameters.
    """
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(4, 8, 8), norm_num_groups=16,
    )


def build_unet_v3() -> UNet2DConditionModel:
    """A candidate after v2 (issue 14, not trained yet): v2 with two transformer layers in every block.

    The probes found v1's and v2's subject placed through cross-attention at 8x8, self-attention carrying
    none of it (P6); a second self-attention layer per block doubles what self-attention can route
    (the issue's "two transformer layers per block"). 9.6M parameters.
    """
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(4, 8, 8), norm_num_groups=16, transformer_layers_per_block=2,
    )


def build_unet_v4() -> UNet2DConditionModel:
    """A candidate for the 32x32 latent of the factor-2 VAE (issue 14): v2's layout one level finer.

    Blocks at 32x32, 16x16 and 8x8 with self- and cross-attention in each, like SD 1.x's 64/32/16 levels, so
    long-range structure at the two finer levels can only travel through attention. Widths halve toward
    the finer levels (32, 64, 128), which keeps a convolution's cost near v2's; heads of 16 channels as in
    v2. Not trained yet.
    """
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(2, 4, 8), norm_num_groups=16,
    )


def mute_cross_attention(unet: UNet2DConditionModel, sides: tuple[int, ...]) -> list[str]:
    """Cut the text out of the cross-attention layers whose feature map is `sides` x `sides`; returns their names.

    Zero value and output projections make a layer's result a text-free constant (the output bias), and
    they stay zero under any gradient training, DreamBooth and LoRA included: the output projection's
    gradient is the layer's attention result (zero), the value projection's passes through the output
    projection (zero). So the text can reach the image only at the other levels, while the folder stays a
    plain `UNet2DConditionModel` (issue 14: in v2 the text places the subject through the 8x8
    cross-attention, and self-attention does not get a say).
    """
    from layout_retouch.layers import attention_layers

    side = unet.config.sample_size
    muted = [layer.name for layer in attention_layers(unet)
             if layer.cross and round(side * layer.resolution) in sides]
    modules = dict(unet.named_modules())
    for name in muted:
        for weight in (modules[name].to_v.weight, modules[name].to_v.bias, modules[name].to_out[0].weight):
            if weight is not None:
                weight.data.zero_()
    return muted


# Toy UNet layouts by name (train_vanilla.py --arch): "v1" the first world's layout, "v2" every block attends (shipped),
# "v3" every block attends twice, "v4" v2 on the 32x32 latent (needs the factor-2 VAE, --vae-factor 2).
UNET_ARCHITECTURES = {"v1": build_unet, "v2": build_unet_v2, "v3": build_unet_v3, "v4": build_unet_v4}
SHIPPED_UNET_ARCH = "v2"  # the layout of models/vanilla/unet (toyworld/README.md, "Which UNet is shipped")
# The VAE factor each UNet layout's latent side assumes (64 px images).
UNET_VAE_FACTOR = {"v1": 4, "v2": 4, "v3": 4, "v4": 2}


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
