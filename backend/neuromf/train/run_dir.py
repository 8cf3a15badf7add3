"""Output folders: refuse to mix two different runs in one folder unless asked to resume or overwrite."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from neuromf.config import RunConfig
from neuromf.train.checkpoint import checkpoint_paths


def prepare_run_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite conflict: resume continues a run, overwrite deletes it")
    out_dir = Path(out_dir)
    weights, _ = checkpoint_paths(out_dir)
    if resume:
        if not weights.is_file():
            raise FileNotFoundError(f"{out_dir}: nothing to resume (no {weights.name})")
        saved = out_dir / "config.yaml"
        if saved.is_file():
            before = yaml.safe_load(saved.read_text())
            now = cfg.to_dict()
            changed = [f"{s}.{k}" for s in ("model", "data", "lora") for k in now.get(s, {})
                       if before.get(s, {}).get(k) != now[s][k]]
            if changed:
                raise ValueError(f"{out_dir}: cannot resume with a different setup; changed keys: {changed}")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: output folder already holds a run; pass --resume to continue it or "
                                  "--overwrite to replace it")
        if not (weights.is_file() or (out_dir / "config.yaml").is_file()):
            raise FileExistsError(f"{out_dir}: not a NeuroMF run folder (no config.yaml or checkpoint); refusing to "
                                  "delete it with --overwrite: choose an empty or new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir
