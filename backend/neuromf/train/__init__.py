"""The one training loop (a generator of progress events), EMA and checkpoints."""

from neuromf.train.loop import NonFiniteLossError, TrainEvent, TrainResult, TrainTask, run_to_end, train

__all__ = ["NonFiniteLossError", "TrainEvent", "TrainResult", "TrainTask", "run_to_end", "train"]
