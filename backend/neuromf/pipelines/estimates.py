"""How long a training run should take, from its config as `neuromf train-joint` and the LoRA dock take it:
`neuromf.estimates.training_estimate` with the cases of its data folder and its steps (here, above `data`,
where data folders are read)."""

from __future__ import annotations

from typing import Any

from neuromf.estimates import Estimate, training_estimate, training_step_seconds


def training_cases(cfg: Any) -> int:
    """How many FCD cases a run of `cfg` (a `RunConfig`) trains on (its data folder's split), each encoded into
    latents before the first step: a file listing, cheap enough for a GUI thread."""
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.io.bids import discover_cases

    cases = discover_cases(resolve_data_dir(cfg.data.data_dir), group="fcd", split=cfg.data.split)
    return len([case for case in cases if case.mask is not None])


def training_run_estimate(config: str, cfg: Any, load: tuple[float, int] | None = None) -> Estimate | None:
    """`training_estimate` of a run of `cfg`, loaded from the packaged config `config`: its cases
    (`training_cases`), its steps (`max_steps`, else its epochs over those cases) at its batch size. None without
    a rate for `config` (the data folder is then not listed)."""
    if training_step_seconds(config, cfg.training.batch_size) is None:
        return None
    cases = training_cases(cfg)
    steps = cfg.training.max_steps or cfg.training.max_epochs * -(-cases // cfg.training.batch_size)
    return training_estimate(config, cases, steps, cfg.training.batch_size, load=load)


__all__ = ["training_cases", "training_run_estimate"]
