"""Building timm models with weights from local, offline sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (optionally under
    'state_dict' / 'model'); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise ValueError(
                f"checkpoint {path} is not a readable safetensors file: {err}"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict")
    return state


def create(
    name: str, checkpoint: str | Path | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """A timm model in eval mode: random weights, timm's pretrained weights (needs the hub), or
    a local checkpoint loaded strictly (a mismatch is reported with the file name)."""
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model={name!r} is not a timm model name: {err}") from err
        raise
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {name}: {err}") from err
    return model.eval()
