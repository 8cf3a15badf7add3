"""The adapter sidecar as a typed artefact: save/load round trip, old sidecars, errors that name the file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from neuromf.io.nifti import Preprocessing
from neuromf.models.adapter_meta import SIDECAR, AdapterMeta, adapter_meta, generation_mode, resolve_adapter_dir
from neuromf.weights import WeightFileError


def _joint() -> AdapterMeta:
    return AdapterMeta(mode="joint", base_checkpoint="base", base_sha256="abc", base_preset="tiny", vae="v",
                       vae_preset="tiny", vae_identity="tiny:1:x", scale_factor=1.5,
                       preprocessing=Preprocessing(shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0)).key(),
                       latent_shape=[12, 8, 8, 8], channels={"image": 4, "mask": 8}, config={"lora": {"rank": 2}},
                       strategy="sdf", mask_scale=0.9)


def test_round_trip_and_derived_fields(tmp_path):
    meta = _joint()
    path = meta.save(tmp_path)
    assert path == tmp_path / SIDECAR and json.loads(path.read_text())["kind"] == "neuromf_lora_adapter"
    back = AdapterMeta.load(tmp_path)
    assert back.to_dict() == json.loads(json.dumps(meta.to_dict()))  # JSON turns tuples into lists
    assert (back.n_image, back.n_mask, back.prep.shape, back.prep.clip_max) == (4, 8, (32, 32, 32), 2.0)
    assert back.vae_reference() == {"vae": "v", "vae_preset": "tiny", "vae_identity": "tiny:1:x", "scale_factor": 1.5}


def test_old_sidecar_without_mode_and_with_unknown_entries_loads(tmp_path):
    values = _joint().to_dict()
    del values["mode"], values["sdf_subgrid"]
    values["written_by_a_newer_version"] = 1
    (tmp_path / SIDECAR).write_text(json.dumps(values))
    meta = AdapterMeta.load(tmp_path)
    assert meta.mode == "joint" and meta.sdf_subgrid == 2  # the default it was trained with


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("base_sha256"), "lacks 'base_sha256'"),
    (lambda d: d.update(kind="something_else"), "not a NeuroMF adapter sidecar"),
    (lambda d: d.update(channels={"image": 4}), "'channels' must hold"),
    (lambda d: d.update(mode="conditional", kind="neuromf_controlnet_adapter"), "lacks its 'controlnet'"),
    (lambda d: d.update(inpaint_guidance=-1), "'inpaint_guidance' must be a number >= 0"),
    (lambda d: d.update(inpaint_guidance="high"), "'inpaint_guidance' must be a finite number or null"),
    (lambda d: d.update(render_guidance=-0.5), "'render_guidance' must be a number >= 0"),
])
def test_bad_sidecars_name_file_and_problem(tmp_path, edit, match):
    values = _joint().to_dict()
    edit(values)
    (tmp_path / SIDECAR).write_text(json.dumps(values))
    with pytest.raises(WeightFileError, match=match) as info:
        AdapterMeta.load(tmp_path)
    assert str(tmp_path / SIDECAR) in str(info.value)


def test_each_use_of_a_conditional_adapter_has_its_own_guidance_falling_back_to_guidance():
    """Rendering a joint mask's FLAIR and inpainting each take their own sidecar guidance where one was measured,
    else the adapter's `guidance`; a guidance given explicitly wins over both."""
    plain = replace(_joint(), guidance=1.3)
    assert (plain.guidance_scale(), plain.render_guidance_scale(), plain.inpaint_guidance_scale()) == (1.3,) * 3
    tuned = replace(plain, render_guidance=1.2, inpaint_guidance=1.1)
    assert (tuned.guidance_scale(), tuned.render_guidance_scale(), tuned.inpaint_guidance_scale()) == (1.3, 1.2, 1.1)
    assert tuned.render_guidance_scale(1.0) == 1.0 and tuned.inpaint_guidance_scale(2.0) == 2.0


def test_missing_and_unreadable_sidecar(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a NeuroMF adapter"):
        AdapterMeta.load(tmp_path)
    (tmp_path / SIDECAR).write_bytes(b"\x80\x81 not json")
    with pytest.raises(WeightFileError, match="not readable JSON"):
        AdapterMeta.load(tmp_path)


def test_shipped_adapters_load_through_the_dataclass():
    joint, conditional = adapter_meta("embedded", "joint"), adapter_meta("embedded", "conditional")
    assert joint.mode == "joint" and joint.strategy in ("vae", "downsample", "sdf") and joint.n_mask > 0
    assert conditional.mode == "conditional" and conditional.controlnet["in_channels"] == 4
    # the 2 mm conditional adapter inpaints, generates and renders joint masks at the mask guidances measured (each
    # apart) on tiled decodes
    assert (conditional.inpaint_guidance_scale(), conditional.guidance_scale()) == (1.3, 1.3)
    assert conditional.render_guidance_scale() == 1.2
    assert generation_mode(resolve_adapter_dir("embedded", "conditional")) == "conditional"
    assert generation_mode(resolve_adapter_dir("embedded", "joint")) == "joint"
