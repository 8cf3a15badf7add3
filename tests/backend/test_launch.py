"""`neuromf.train.launch`: LoRA fine-tuning in N local processes under torchrun, driven as a background job (the
napari plugin's "all GPUs" device). Real torchrun, 2 CPU processes (gloo, 1 thread each), a random `tiny` base
model on a 32^3 / 6 mm grid. The stop-during-training path (checkpoint, resume) runs through the LoRA widget in
tests/plugin/test_plugin_training_jobs.py; here: a stop while rank 0 encodes, and a failing start."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path, **overrides):
    from neuromf.config import load_config
    from neuromf.weights import sample_data_root

    values = {"model.preset": "tiny", "data.data_dir": str(sample_data_root() / "fcd_phantoms"),
              "data.cache_dir": str(tmp_path / "cache"), "data.mask_strategy": "downsample", "data.flip": False,
              "lora.rank": 2, "training.max_steps": 50, "training.batch_size": 2, "training.device": "cpu",
              "training.checkpoint_every": 0, "training.output_dir": str(tmp_path / "run")}
    return load_config("demo_lora", {**values, **overrides})


def test_torchrun_command_runs_the_rank_entry_point(tmp_path):
    from neuromf.train.launch import torchrun_command

    command = torchrun_command(4, tmp_path / "spec.json")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-3:] == ["-m", "neuromf.train.launch", str(tmp_path / "spec.json")]


def test_a_stop_while_rank0_encodes_ends_every_rank_and_leaves_no_folder(tiny_base, tmp_path):
    """Stop after the first encoded case: rank 0 ends the start after the case it is encoding (not after all
    of them), the fresh run folder is removed as after a failed start, and no rank is left running."""
    from neuromf.train.launch import launch_lora

    cfg = _config(tmp_path)
    process = launch_lora(cfg, 2, "cpu", tiny_base)
    encoded = []
    try:
        events = process.events()
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                result = done.value
                break
            assert event.kind == "encoding", event  # no training step may start
            encoded.append(event.step)
            if len(encoded) == 1:
                process.stop()
                stopped_at = time.monotonic()
        ended_s = time.monotonic() - stopped_at
    finally:
        process.close()
    total = event.total_steps
    assert result is None and process.cancelled is not None
    done, cases = process.cancelled
    assert cases == total > 4 and done <= 2 < total  # at most the case under way when Stop came was finished
    assert not Path(cfg.training.output_dir).exists()
    assert not process.running and ended_s < 30
    assert not process.scratch.exists()


def test_the_first_failing_rank_names_the_error_when_rank_0_could_not():
    from neuromf.train.launch import rank_error

    lines = ["[neuromf] rank 0/2: lost contact with another rank (DistBackendError: Connection closed by peer); "
             "look for the first failing rank's message",
             "[neuromf] rank 1/2 failed: FileNotFoundError: base checkpoint /x/no_such_base: not found",
             "[neuromf] rank 0/2 failed: RuntimeError: later"]
    assert rank_error(lines) == {"type": "FileNotFoundError", "message": "base checkpoint /x/no_such_base: not found"}
    assert rank_error(lines[:1]) == {} and rank_error([]) == {}  # losing contact names no cause


def test_a_failing_start_raises_with_the_error_and_the_output_tail(tiny_base, tmp_path):
    """Both ranks fail on the missing base; whichever fails first, the error names its type and the file (rank 0's
    own report, or the first failing rank's when torchrun stopped rank 0 before it could report: seen in CI)."""
    from neuromf.train.launch import TrainingProcessError, launch_lora

    cfg = _config(tmp_path)
    process = launch_lora(cfg, 2, "cpu", tmp_path / "no_such_base")
    try:
        with pytest.raises(TrainingProcessError) as failed:
            for _ in process.events():
                pass
    finally:
        process.close()
    err = failed.value
    assert err.returncode not in (0, None)
    assert err.error_type == "FileNotFoundError" and "no_such_base" in err.error_message
    assert "exited with code" in str(err) and "no_such_base" in str(err)
    assert any(line.startswith("[neuromf] rank") and "no_such_base" in line for line in err.rank_lines), err.tail
    assert err.tail and "no_such_base" in "\n".join(err.tail + err.rank_lines)
    assert not Path(cfg.training.output_dir).exists()  # a failed start leaves nothing behind
