"""Progress events of long jobs (training, encoding) and the helper that drives such a generator to its end.

They live below every package that yields them (`data` encodes with them, `train` trains with them), so that a
data module never imports the training loop. `neuromf.train` re-exports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainEvent:
    """One progress event of the training generator: what happened (`kind`), where (step, epoch), the
    loss and its parts, the learning rate, the ETA, a written file or a preview sample."""

    # "encoding" (a pipeline's cases before training: step = cases done of total_steps) | "step" | "skipped" |
    # "epoch" | "checkpoint" | "preview" | "done" | "stopped"
    kind: str
    step: int
    epoch: int
    total_steps: int
    loss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    eta_s: float | None = None
    path: Path | None = None
    message: str = ""
    preview: Any = None


@dataclass
class TrainResult:
    """What a finished or stopped run leaves: its folder, last step, checkpoint and exported model."""

    out_dir: Path
    step: int
    stopped: bool
    checkpoint: Path
    export: Path | None
    skipped_steps: int


def run_to_end(events: Generator[TrainEvent, None, TrainResult],
               on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Drive a training generator to completion (the CLI, scripts and tests); also any generator of progress
    records with a return value, e.g. the latent encoders of `neuromf.data.latents`.

    Args:
        events: a training generator (`train`, or a pipeline's `train_*`), or another progress generator.
        on_event: called with every TrainEvent (progress bars, logs); an exception it raises is thrown into the
            training generator (so a fresh run that saved no checkpoint removes its folder) and then re-raised.
    Returns:
        The generator's TrainResult.
    """
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            try:
                on_event(event)
            except Exception as err:  # the callback's failure is the run's: a fresh run undoes its start
                with contextlib.suppress(Exception):  # the generator re-raises it (or fails on its own)
                    events.throw(err)
                raise


__all__ = ["TrainEvent", "TrainResult", "run_to_end"]
