"""Training checkpoints as safetensors + JSON (no pickle): parameters, optimizer, random state, step.

A checkpoint folder `checkpoint-<step>/` holds `trainable.safetensors` (the trained tensors by
name), `optimizer.safetensors` (AdamW's per-parameter moments) and `state.json` (the step, the
optimizer's hyperparameters, the training settings it belongs to). Resuming from it continues the
run exactly: the same batches, noise and timesteps as if it had never stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from layout_retouch.errors import ModelLoadError

PREFIX = "checkpoint-"


def save_checkpoint(
    folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    generator: torch.Generator, fingerprint: dict, keep: int,
) -> Path:
    """Write checkpoint-<step> under `folder` and delete all but the newest `keep`."""
    path = folder / f"{PREFIX}{step}"
    tmp = folder / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, tmp / "trainable.safetensors")
    opt = optimizer.state_dict()
    tensors = {"rng": generator.get_state()}
    for index, state in opt["state"].items():
        for name, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, tmp / "optimizer.safetensors")
    state = {"step": step, "param_groups": opt["param_groups"], "fingerprint": fingerprint}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint is either complete or absent
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(
    path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    generator: torch.Generator, fingerprint: dict,
) -> int:
    """Restore parameters, optimizer and random state from `path`; returns the step it was saved at."""
    state = json.loads((path / "state.json").read_text())
    expected = json.loads(json.dumps(fingerprint))  # as JSON stores it (tuples become lists)
    if state["fingerprint"] != expected:
        changed = sorted(k for k in expected if state["fingerprint"].get(k) != expected[k])
        raise ModelLoadError(
            f"checkpoint {str(path)!r} was made with other settings ({', '.join(changed)}); rerun with the "
            "same settings, or without --resume (or with another --work-dir) to start afresh"
        )
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(params):
        raise ModelLoadError(f"checkpoint {str(path)!r} does not hold this model's trainable tensors")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    tensors = load_file(path / "optimizer.safetensors")
    generator.set_state(tensors.pop("rng"))
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return int(state["step"])
