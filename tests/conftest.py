import os

# A hub lookup without network hangs for minutes: every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder with a tiny base model, one personalization of each kind and a reference photo."""
    from tiny_world import (
        make_base,
        make_custom_diffusion,
        make_dreambooth,
        make_lora,
        make_photo,
        make_textual_inversion,
    )

    root = tmp_path_factory.mktemp("tiny")
    make_base(root / "base")
    make_dreambooth(root / "dreambooth")
    make_textual_inversion(root / "learned_embeds.safetensors")
    make_lora(root / "lora")
    make_custom_diffusion(root / "custom_diffusion")
    make_photo(root / "reference.png")
    return root
