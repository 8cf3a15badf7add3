"""Sampling the (r, t) pairs MeanFlow trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimeSampler:
    """Two logit-normal draws, t = max and r = min; r = t for all but `ratio_r_neq_t` of the batch.

    r = t reduces the MeanFlow target to the instantaneous velocity (flow matching); the paper found
    25% of pairs with r != t best.
    """

    mean: float = -0.4
    std: float = 1.0
    ratio_r_neq_t: float = 0.25

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one (r, t) pair per sample.

        Args:
            batch_size: B.
            device: where the returned times go.
            generator: seeds the draws (on its own device); None uses the global RNG.
        Returns:
            (r, t): (B,) times in (0, 1) with r <= t, r = t for about 1 - `ratio_r_neq_t` of the batch.
        """
        draws = torch.randn(2, batch_size, generator=generator, device=generator.device if generator else "cpu")
        draws = torch.sigmoid(draws * self.std + self.mean)
        t = draws.max(dim=0).values
        r = draws.min(dim=0).values
        keep = torch.rand(batch_size, generator=generator, device=draws.device) < self.ratio_r_neq_t
        r = torch.where(keep, r, t)
        return r.to(device), t.to(device)
