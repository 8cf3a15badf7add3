"""Exponential moving average of the trainable parameters (the weights we sample with)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (requires_grad), by name: what EMA, DDP and the optimiser see."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class EMA:
    """Exponential moving average of the trainable parameters; the exported weights are the average."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of shadow <- decay * shadow + (1 - decay) * current."""
        for name, p in trainable_parameters(model).items():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name (saved with the checkpoint)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averaged parameters; a missing one is an error naming it."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters (e.g. {sorted(missing)[:3]})")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into `model` (for previews and export)."""
        params = trainable_parameters(model)
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])
