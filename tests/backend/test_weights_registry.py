"""The registry of shipped weight files: every one listed with its sha256, checked at load, shared files stored
once, and a registry rewrite after a retrain (on a copy, never on the shipped files)."""

from __future__ import annotations

import json
import shutil

import pytest

from neuromf.weights import (
    REGISTRY,
    SHIPPED_NAMES,
    WeightFileError,
    embedded_model_dir,
    file_sha256,
    sample_data_root,
    shipped_file,
    update_registry,
    weights_registry,
)

MODELS = sample_data_root() / "models"


def test_every_shipped_weight_file_is_registered_with_its_hash():
    files = weights_registry()
    on_disk = {p.relative_to(MODELS).as_posix() for p in MODELS.glob("*/*.safetensors")}
    stored = {k for k, v in files.items() if "same_as" not in v}
    assert stored == on_disk
    for relative in sorted(stored):
        assert file_sha256(MODELS / relative) == files[relative]["sha256"], relative
        assert (MODELS / relative).stat().st_size == files[relative]["bytes"], relative
    assert len({files[k]["sha256"] for k in stored}) == len(stored), "byte-identical weight files stored twice"


def test_a_shared_file_resolves_to_its_one_copy():
    joint_prior = embedded_model_dir("joint_fine") / "mask_prior.safetensors"
    assert not joint_prior.exists()
    assert shipped_file(joint_prior) == embedded_model_dir("cond_fine") / "mask_prior.safetensors"
    from neuromf.data.mask_prior import MaskPrior

    assert len(MaskPrior.load(joint_prior).lesions) == 128


def test_shipped_names_by_kind_and_grid():
    assert SHIPPED_NAMES["joint_2mm"] == "joint_fine" and SHIPPED_NAMES["conditional_3mm"] == "cond_demo"
    assert embedded_model_dir("vae_3mm") == embedded_model_dir("vae_small")


def test_a_changed_shipped_file_is_refused_naming_it(tmp_path, monkeypatch):
    """A copy of the shipped models folder whose ControlNet lost one byte: loading names the file and the fix."""
    import neuromf.weights as weights

    copy = tmp_path / "sample_data"
    shutil.copytree(sample_data_root() / "models", copy / "models",
                    ignore=lambda d, names: [n for n in names if n.startswith("base_") or n.startswith("vae_")])
    monkeypatch.setattr(weights, "sample_data_root", lambda: copy)
    target = copy / "models" / "cond_demo" / "controlnet.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"cond_demo/controlnet.safetensors: shipped weight file does not match"):
        shipped_file(target)
    from neuromf.weights import load_state_dict

    with pytest.raises(WeightFileError, match="update_weights_registry"):
        load_state_dict(target)
    assert shipped_file(tmp_path / "elsewhere.safetensors") == tmp_path / "elsewhere.safetensors"  # not shipped


def test_update_registry_rehashes_and_stores_a_duplicate_once(tmp_path):
    models = tmp_path / "models"
    for name in ("cond_demo", "lora_demo"):
        shutil.copytree(MODELS / name, models / name)
    shutil.copy(models / "cond_demo" / "mask_prior.safetensors", models / "lora_demo" / "mask_prior.safetensors")
    files = update_registry(models)
    assert files["lora_demo/mask_prior.safetensors"] == {"same_as": "cond_demo/mask_prior.safetensors"}
    assert not (models / "lora_demo" / "mask_prior.safetensors").exists()
    shipped = weights_registry()["cond_demo/controlnet.safetensors"]
    assert files["cond_demo/controlnet.safetensors"]["sha256"] == shipped["sha256"]
    assert json.loads((models / REGISTRY).read_text())["files"] == files
    assert update_registry(models) == files  # idempotent: the shared entry survives a second rewrite


def test_shipped_networks_are_stored_in_half_precision():
    """Every shipped network (VAEs, UNets, ControlNets) keeps its floating tensors as float16: the repository's
    weights stay within its size budget; loading casts them back into float32 parameters."""
    from safetensors import safe_open

    networks = sorted(p for p in MODELS.glob("*/*.safetensors") if p.name in ("model.safetensors",
                                                                               "controlnet.safetensors"))
    assert {p.parent.name for p in networks} >= {"vae_fine", "vae_small", "base_fine", "base_small", "cond_fine",
                                                 "cond_demo"}
    for path in networks:
        with safe_open(str(path), framework="pt") as fh:
            dtypes = {fh.get_slice(key).get_dtype() for key in fh.keys()}
        assert dtypes == {"F16"}, (path, dtypes)


@pytest.mark.parametrize("sidecar", ["base_fine/model.json", "base_small/model.json", "cond_fine/neuromf_adapter.json",
                                     "cond_demo/neuromf_adapter.json", "joint_fine/neuromf_adapter.json",
                                     "lora_demo/neuromf_adapter.json"])
def test_each_shipped_model_names_the_vae_it_was_trained_with(sidecar):
    """The VAE identity a shipped model records is the content hash of the shipped VAE it names, as loaded (the
    check that refuses a model on another VAE's latents passes for every shipped one)."""
    from neuromf.vae import vae_for

    meta = json.loads((MODELS / sidecar).read_text())
    assert vae_for(meta).identity == meta["vae_identity"]


def test_tracked_files_stay_within_the_repository_budget():
    """The files git tracks (weights, sample data, pictures, code) stay <= 60 MB: a retrain replaces weights in
    place, pictures are palette PNGs; a new copy of a weight file shows up here before it lands."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {name: (root / name).stat().st_size for name in listed.decode().split("\0") if name
             and (root / name).is_file()}
    largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
    assert sum(sizes.values()) <= 60e6, f"{sum(sizes.values()) / 1e6:.1f} MB tracked; largest: {largest}"
