"""The lesion check of single pairs (neuromf.eval.lesion_check): references built from real lesions and read back,
the verdict in words, and the references the shipped adapters carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from testkit import TEST_SHAPE, TEST_SPACING


def test_a_real_lesion_passes_and_broken_masks_fail_with_the_reason(phantom_dir):
    from neuromf.eval.lesion_check import (
        MASK_CRITERIA,
        build_reference,
        check_pair,
        reference_from_dict,
        reference_to_dict,
    )
    from neuromf.eval.metrics import load_real_cases
    from neuromf.io.nifti import Preprocessing

    prep = Preprocessing(shape=TEST_SHAPE, spacing=TEST_SPACING)
    ref, source = build_reference(phantom_dir, prep)
    assert f"{ref.n} real FCD lesions" in source and ref.n >= 3
    again = reference_from_dict(json.loads(json.dumps(reference_to_dict(ref, source))))
    assert again == ref  # what lesion_reference.json holds reads back as the same reference

    real, _ = load_real_cases(phantom_dir, prep)
    image, mask = real[0]["image"], real[0]["mask"]
    _, verdict = check_pair(image, mask, prep.spacing, ref, MASK_CRITERIA)
    assert verdict.lesion_like and verdict.describe() == "passes the lesion check (mask)"
    _, empty = check_pair(image, np.zeros_like(mask), prep.spacing, ref)
    assert not empty.lesion_like and empty.describe().startswith("fails the lesion check: empty mask")
    outside = np.zeros_like(mask)
    outside[:3, :3, :3] = True  # a corner of the field of view: air
    _, verdict = check_pair(image, outside, prep.spacing, ref)
    assert "inside_brain" in verdict.failed and "partly outside the brain" in verdict.describe()


@pytest.mark.parametrize("folder", ["joint_fine", "cond_fine", "lora_demo", "cond_demo"])
def test_shipped_adapters_carry_the_reference_of_their_training_lesions(folder):
    from neuromf.eval.lesion_check import REFERENCE_FILE, reference_from_dict
    from neuromf.models.adapter_meta import AdapterMeta
    from neuromf.weights import sample_data_root

    root = sample_data_root() / "models" / folder
    values = json.loads((root / REFERENCE_FILE).read_text())
    ref = reference_from_dict(values)
    meta = AdapterMeta.load(root)
    assert str(meta.data_dir) in values["source"] and f"on the {meta.prep.shape[0]} voxel grid" in values["source"]
    assert ref.n == len(ref.volumes_cm3) == len(ref.positions) and ref.min_volume_cm3 <= ref.max_volume_cm3
    assert values["accepted_volume_cm3"] == pytest.approx(list(ref.volume_range))


@pytest.mark.parametrize("name", ["embedded", "embedded-3mm", "embedded-fine"])
def test_every_shipped_name_finds_the_reference_of_each_mode(name):
    """A shipped name with an explicit mode is that mode's shipped folder (embedded-3mm's conditional adapter was
    refused once: the lesion check of its pairs went missing)."""
    from neuromf.eval.lesion_check import adapter_reference
    from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir

    for mode in ("joint", "conditional"):
        folder = resolve_adapter_dir(name, mode)
        assert AdapterMeta.load(folder).mode == mode
        assert adapter_reference(name, None, mode).n >= 20


def test_adapter_check_summary_names_each_failed_criterion_once():
    """The Generate dock's one-line verdict: an empty mask is named for its emptiness alone, the other failures in
    the lesion check's order, at most two named; a passing check says it makes lesions."""
    from neuromf.generation.adapter_check import AdapterCheck

    def row(*failed: str) -> dict:
        return {"volume_cm3": 1.0, "lesion_like": not failed, "failed": list(failed)}

    empty = row("nonempty", "largest_share", "volume", "inside_brain", "depth", "location")
    assert AdapterCheck("a", False, "", [empty, empty]).summary() == "2 of 2 pairs fail: empty mask"
    mixed = AdapterCheck("a", False, "", [row("location", "volume"), row(), row("inside_brain")])
    assert mixed.summary() == "2 of 3 pairs fail: a size no real lesion has, partly outside the brain and 1 more"
    assert mixed.summary(most=3).endswith("partly outside the brain, far from every real lesion's site")
    assert AdapterCheck("a", True, "", [row(), row()]).summary() == "makes lesions (2 of 2 pairs pass)"
