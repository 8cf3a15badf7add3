"""The latent cache: hits, misses, invalidation by VAE/preprocessing/content, and corrupt entries rebuilt."""

from __future__ import annotations

import json

import numpy as np
import torch
from testkit import write_nifti

from neuromf.data.latent_cache import LatentCache


def test_latent_cache_hit_miss_invalidation_and_corruption(tmp_path):
    source = write_nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32))
    calls = []

    def compute():
        calls.append(1)
        return {"z": torch.full((2, 2), float(len(calls)))}

    cache = LatentCache(tmp_path / "cache", "vae-1", {"shape": [4, 4, 4]})
    first = cache.get([source], "orig", compute)
    assert cache.get([source], "orig", compute)["z"].equal(first["z"]) and len(calls) == 1
    assert cache.stats() == {"hits": 1, "misses": 1, "rebuilt": 0}
    # a fresh cache object reads the manifest from disk
    assert LatentCache(tmp_path / "cache", "vae-1", {"shape": [4, 4, 4]}).get([source], "orig", compute)["z"][0, 0] == 1
    # another VAE or preprocessing or source content -> new key, re-encoded; the stale file is removed
    other = LatentCache(tmp_path / "cache", "vae-2", {"shape": [4, 4, 4]})
    assert other.get([source], "orig", compute)["z"][0, 0] == 2 and other.stats()["misses"] == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    write_nifti(source, np.zeros((4, 4, 4), np.float32))
    assert other.get([source], "orig", compute)["z"][0, 0] == 3
    # a corrupt entry is detected and rebuilt
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    entry = next(iter(manifest.values()))
    (tmp_path / "cache" / entry["file"]).write_bytes(b"garbage")
    assert other.get([source], "orig", compute)["z"][0, 0] == 4 and other.stats()["rebuilt"] == 1
