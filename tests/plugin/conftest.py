"""Fixtures of the plugin tests: a temporary user folder, a few phantom cases, a tiny random base model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SUBJECTS = ("sub-00001", "sub-00002", "sub-00003")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Runs, generated pairs and the remembered widget state under tmp, and a fresh shared plugin state."""
    from napari_neuromf import _state

    monkeypatch.setenv("NEUROMF_HOME", str(tmp_path / "neuromf_home"))
    monkeypatch.setattr(_state, "STATE", _state.PluginState())


@pytest.fixture(scope="session")
def phantom_subset(tmp_path_factory) -> Path:
    """Three FCD phantom patients from sample_data (train split), as a small BIDS tree."""
    from neuromf.weights import sample_data_root

    src = sample_data_root() / "fcd_phantoms"
    dst = tmp_path_factory.mktemp("phantoms") / "bids"
    dst.mkdir()
    for subject in SUBJECTS:
        shutil.copytree(src / subject, dst / subject)
    rows = [line for line in (src / "participants.tsv").read_text().splitlines()
            if line.startswith("participant_id") or line.split("\t")[0] in SUBJECTS]
    (dst / "participants.tsv").write_text("\n".join(rows) + "\n")
    return dst


