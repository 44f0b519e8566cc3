"""Training checkpoints as safetensors: module weights, optimizer moments and the step count.

Long toy-world trainings resume from these after an interruption; no pickle is involved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    step: int) -> None:
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{i}.{key}"] = value.detach().contiguous()
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)  # never leave a half-written checkpoint


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, device: str | torch.device = "cpu") -> int:
    """Restore modules and optimizer (its moments on `device`, beside the parameters) from `path`; returns
    the step it was saved at."""
    from safetensors import safe_open

    tensors = load_file(str(path), device=str(device))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        keys = [k for k in tensors if k.startswith(f"optimizer.{i}.")]
        if keys:
            optimizer.state[p] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])
