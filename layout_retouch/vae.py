"""The VAE in half precision: SDXL's overflows in fp16, so it runs in fp32 for the call, as diffusers does.

A VAE whose config sets `force_upcast` (SDXL's) is upcast around each encode and decode when it is held
in fp16, then cast back; one made for fp16 (madebyollin/sdxl-vae-fp16-fix, `force_upcast: false`, given
with `vae=` / `--vae`) runs as it is. SD 1.x keeps diffusers' SD behaviour: no upcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def needs_upcast(vae, architecture) -> bool:
    return architecture.upcast_vae and vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


@contextmanager
def vae_precision(vae, architecture) -> Iterator[torch.dtype]:
    """Run the VAE in the precision it needs; yields the dtype its inputs should have."""
    if not needs_upcast(vae, architecture):
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)
