"""A model of plain torch blocks, quick to build in a fresh interpreter (no transformers import): for tests
that start processes."""

from __future__ import annotations

import torch
from torch import nn


def blocks(layers: int, width: int = 256, seed: int = 0) -> nn.Sequential:
    """``layers`` blocks of Linear + GELU, the model itself its layer stack (its layers are ``0``, ``1``, ...)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)]).eval()


def sample(width: int = 256) -> torch.Tensor:
    return torch.randn(4, width, generator=torch.Generator().manual_seed(1))


def state(model: nn.Module) -> dict:
    """Every tensor's bytes and storage address: to check a model is as it was, storage for storage."""
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


def same_state(model: nn.Module, before: dict) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == before.keys() and all(
        torch.equal(now[k], v) and now[k].data_ptr() == ptr for k, (v, ptr) in before.items()
    )
