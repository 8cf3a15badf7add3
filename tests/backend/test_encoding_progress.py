"""Latent encoding before training reports per-case progress: the training generators yield one "encoding" event
per case (cached cases too) before their first step, and the CLI's progress bar starts with the first step."""

from __future__ import annotations

import pytest
from testkit import tiny_config

from neuromf.train import TrainEvent, TrainResult, run_to_end


def _encoding_before_training(events: list[TrainEvent], n_cases: int) -> list[TrainEvent]:
    """The encoding events, checked to count 1..n_cases of n_cases and to come before every other event."""
    encoding = [e for e in events if e.kind == "encoding"]
    assert [e.step for e in encoding] == list(range(1, n_cases + 1))
    assert {e.total_steps for e in encoding} == {n_cases}
    assert events[:n_cases] == encoding  # nothing else happens before the cases are encoded
    assert events[n_cases].kind == "step" and events[n_cases].step == 1
    assert all(e.eta_s is not None and e.eta_s >= 0 for e in encoding) and encoding[-1].eta_s == 0
    assert all(f"{e.step}/{n_cases}" in e.message and "encoding" in e.message for e in encoding)
    return encoding


def test_train_base_reports_each_scan_encoded_then_from_the_cache(tmp_path, phantom_dir, tiny_vae_dir):
    from neuromf.pipelines.stage1 import train_base

    for run in ("first", "cached"):  # the second run reads every latent from the cache: the same four events
        cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{"data.group": "hc", "training.max_steps": 1,
                                                                   "training.output_dir": str(tmp_path / run)})
        events: list[TrainEvent] = []
        result = run_to_end(train_base(cfg, progress=False), events.append)
        assert result.step == 1
        encoding = _encoding_before_training(events, 4)  # the phantom tree's 4 healthy scans
        assert encoding[0].message.endswith("_FLAIR.nii.gz)")  # names the scan


@pytest.mark.parametrize("mode", ["lora", "conditional"])
def test_stage2_reports_each_case_encoded(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir, mode):
    """Joint mode encodes the 4 FCD cases; the conditional mode also the 4 healthy ones (with empty masks)."""
    cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{"training.max_steps": 1, "data.mask_strategy":
                                                               "downsample", "lora.rank": 2,
                                                               "conditional.embedding_channels": [8]})
    if mode == "lora":
        from neuromf.pipelines.joint import train_lora as train_fn
    else:
        from neuromf.pipelines.conditional import train_conditional as train_fn
    events: list[TrainEvent] = []
    result = run_to_end(train_fn(cfg, tiny_base_dir, progress=False), events.append)
    assert result.step == 1 and not result.stopped
    _encoding_before_training(events, 4 if mode == "lora" else 8)


def test_cli_bar_starts_with_the_first_training_step(capsys):
    """`drive` leaves the encoding events to the pipeline's encoding bar: its own bar appears with the first step
    and counts steps only (one bar at a time on the terminal)."""
    from neuromf.cli._common import drive

    def events():
        for i in range(1, 4):
            yield TrainEvent("encoding", i, 0, 3, eta_s=0.0, message=f"encoding {i}/3")
        assert "train-x" not in capsys.readouterr().err  # no step bar while the cases are encoded
        for step in (1, 2):
            yield TrainEvent("step", step, 0, 2, loss=1.0 / step, lr=1e-3, eta_s=0.0)
        return TrainResult(None, 2, False, None, None, 0)

    result = drive(events(), "train-x")
    assert result.step == 2
    err = capsys.readouterr().err
    assert "train-x" in err and "2/2" in err and "/3" not in err
