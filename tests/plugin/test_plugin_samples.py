"""File > Open Sample > NeuroMF: every sample opens without freezing napari, and the pre-made generated pairs are
what `python -m napari_neuromf._make_samples` generates from the embedded adapters (real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from gui_helpers import data_layers, in_running_gui

pytestmark = pytest.mark.gui

SAMPLES = ("fcd_phantom_case", "generated_pair", "conditional_pair")
# opening a sample may hold napari's GUI thread this long at most (it used to take 6-15 s). In the running app napari
# adds a sample's first layer (hidden) in its call and the rest comes a turn at a time (`_opening`): 0.19-0.25 s of
# GUI-thread CPU on the 2-core machine at load ~2 (0.43-0.47 s when napari added both layers in one call, 0.44-0.80 s
# at load 3.5, 0.71 s in a CI run of the whole suite). Each sample opens twice and the lower figure counts: a block
# the code causes shows in both, a busy machine's slow turn seldom twice
BLOCK_MS = 700
# the first one of a viewer: measured 0.17 s alone since its axial turn and the caption's glyphs come in turns of
# their own (0.72-0.76 s before; 1.1-1.3 s before the letters moved out)
FIRST_BLOCK_MS = 700
# a generated pair arriving in the Generate dock (its FLAIR and lesion added a turn apart, each hidden, then shown):
# measured 0.14-0.16 s, the first into an empty viewer 0.27-0.29 s (its dims made axial in a turn of their own; 0.34 s
# before, 0.61 s in a CI run of the whole suite on 2 cores); 0.31-0.48 s when both came in one turn
PAIR_BLOCK_MS = 600
FIRST_PAIR_BLOCK_MS = 900


def _menu_sample(viewer, key: str) -> None:
    """File > Open Sample > NeuroMF > `key`: what the menu item calls."""
    from napari._qt._qplugins._qnpe2 import _add_sample

    _add_sample(viewer.window._qt_viewer, "napari-neuromf", key)


def _longest_gap_ms(qtbot, viewer, action) -> float:
    """The most CPU time napari's GUI thread spent between two ticks of a 10 ms QTimer around ``action()`` (called on
    the GUI thread from inside the running event loop, as napari's menu calls a sample), including the first
    drawing of what it added, its layers that come in later turns, and the orientation letters (hidden, then
    shown).

    CPU time of the thread (``time.thread_time``), not wall time: on a machine shared with other jobs the scheduler
    stretches every wall-clock gap, while the work the GUI thread does between two ticks stays what it is.
    """
    from qtpy.QtCore import QTimer

    from napari_neuromf._opening import adding
    from napari_neuromf._viewing import is_view_aid

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.thread_time()))
    timer.start()
    qtbot.wait(100)
    in_running_gui(action, lambda: not adding(viewer) and any(is_view_aid(layer) and layer.visible
                                                               for layer in viewer.layers))
    qtbot.wait(400)  # the letters' first drawing
    timer.stop()
    return max((b - a) * 1000 for a, b in zip(ticks, ticks[1:], strict=False))


def test_each_sample_opens_without_blocking_the_gui(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    # napari's own first use in a process (its layer modules' imports, the unit registry, vispy's font atlas for
    # text, the first draw: ~1.5 s of CPU, the same for any plugin) is paid before measuring, so the figure is what
    # opening a sample costs
    viewer.add_image(np.zeros((8, 8, 8), np.float32))
    viewer.add_labels(np.zeros((8, 8, 8), np.uint8))
    viewer.add_points([[4, 4, 4]], text={"string": ["RLAP"]}, size=1)
    qtbot.wait(300)
    viewer.layers.clear()
    qtbot.wait(100)
    # the first sample of a session also pays NeuroMF's one-time viewing set-up (its modules, the reader preference)
    first = _longest_gap_ms(qtbot, viewer, lambda: _menu_sample(viewer, SAMPLES[0]))
    assert first < FIRST_BLOCK_MS, f"first sample opened: longest GUI-thread gap {first:.0f} ms"
    worst = {}
    for key in SAMPLES:
        gaps = []
        for _ in range(2):
            viewer.layers.clear()
            gaps.append(_longest_gap_ms(qtbot, viewer, lambda key=key: _menu_sample(viewer, key)))
            assert len(data_layers(viewer)) == 2, key
        worst[key] = round(min(gaps))
    print(f"longest GUI-thread gap, first sample {first:.0f} ms, per sample (ms): {worst}")
    assert max(worst.values()) < BLOCK_MS, f"longest GUI-thread gap per sample (ms): {worst}"


def test_generated_pairs_arrive_without_blocking_the_gui(make_napari_viewer, qtbot):
    """Results arriving in the Generate dock (the worker yields a pair; the dock adds its layers): the longest stretch
    of GUI-thread CPU, the first pair into an empty viewer and the next ones, with napari's own first use paid."""
    from gui_helpers import ready, wait_idle

    from napari_neuromf import _generate_run, _sample_data
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._layers import load_nifti
    from neuromf.generation.images import GeneratedPair

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-neuromf", SAMPLES[1])  # napari's and NeuroMF's first use
    widget = ready(qtbot, GenerateWidget(viewer))
    qtbot.wait(300)
    viewer.layers.clear()
    qtbot.wait(100)
    prefix = _sample_data.PAIRS["joint"]
    image, affine, _ = load_nifti(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR.nii.gz")
    mask, _, _ = load_nifti(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR_roi.nii.gz")
    pair = GeneratedPair(0, image, mask, affine, json.loads((_sample_data.SAMPLES_DIR / f"{prefix}.json").read_text()))
    widget.run = _generate_run.GenerateRun("embedded")
    gaps = [_longest_gap_ms(qtbot, viewer, lambda: widget._on_pair(pair)) for _ in range(3)]
    wait_idle(qtbot, widget, 10)
    assert [layer.name for layer in data_layers(viewer)] == [f"gen_00{i} {kind}" for i in range(3)
                                                           for kind in ("FLAIR", "lesion")]
    print(f"longest GUI-thread gap per generated pair (ms): {[round(g) for g in gaps]}")
    assert gaps[0] < FIRST_PAIR_BLOCK_MS and max(gaps[1:]) < PAIR_BLOCK_MS, gaps


def test_samples_load_without_torch_in_a_fresh_process():
    """What the GUI-thread test cannot see once an earlier test imported torch: in a fresh interpreter the three
    samples read their files with nibabel alone (torch and MONAI take 5-15 s to import) and each takes < 1 s of CPU
    time; the samples' module itself imports no nibabel (napari imports it inside File > Open Sample's call, where
    ~40 ms of nibabel's imports held the GUI: the placeholder path reads, and imports, in a worker)."""
    code = """
import json, sys, time
import napari_neuromf._sample_data as samples
assert "nibabel" not in sys.modules, "importing the samples' module imported nibabel"
times = {}
for name in ("fcd_phantom_case", "generated_pair", "conditional_pair"):
    t = time.process_time()  # CPU time: what reading the sample costs, whatever else the machine is doing
    layers = getattr(samples, name)()
    times[name] = time.process_time() - t
    assert len(layers) == 2, name
heavy = sorted(m for m in ("torch", "monai", "peft", "safetensors.torch", "neuromf.io") if m in sys.modules)
print(json.dumps({"times": times, "heavy": heavy}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    assert max(report["times"].values()) < 1.0, report


def _read(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("mode", ["joint", "conditional"])
def test_premade_pairs_carry_a_lesion_made_with_the_generate_defaults(mode):
    """The shipped 2 mm pairs: the Generate dock's settings in their provenance, and a lesion that is brighter than
    the brain (what the 3 mm samples lacked: the joint one had an empty mask)."""
    from napari_neuromf import _make_samples, _sample_data

    prefix = _sample_data.PAIRS[mode]
    meta = json.loads((_sample_data.SAMPLES_DIR / f"{prefix}.json").read_text())
    assert meta["checkpoint"] == "embedded" and meta["steps"] == _make_samples.SETTINGS[mode]["steps"]
    assert meta["sampler"] == _make_samples.SETTINGS[mode]["method"] and "/" not in str(meta.get("rendered_by", ""))
    image = _read(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR.nii.gz")
    mask = _read(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR_roi.nii.gz") > 0
    assert image.shape == mask.shape == (96, 96, 96) and mask.sum() * 8 / 1000 > 0.5  # cm^3 at 2 mm
    assert float(image[mask].mean()) > 1.2 * float(image[image > 0.1].mean())


@pytest.mark.skipif(os.environ.get("NEUROMF_REGENERATE_SAMPLES") != "1",
                    reason="minutes per 2 mm pair on a CPU: set NEUROMF_REGENERATE_SAMPLES=1 (with a GPU, seconds)")
@pytest.mark.parametrize("mode", ["joint", "conditional"])
def test_premade_pairs_are_what_the_script_generates(tmp_path, mode):
    """The shipped files are the script's output now: the same adapter, seed, grid and provenance (regenerated
    with the real embedded models; the FLAIR is stored in steps of 1e-3)."""
    import torch

    from napari_neuromf import _make_samples, _sample_data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script
    try:
        paths = _make_samples.write_pair(_make_samples.generate(mode), mode, tmp_path)
    finally:
        torch.set_num_threads(threads)
    prefix = _make_samples.PAIRS[mode]
    assert prefix == _sample_data.PAIRS[mode]
    shipped = [_sample_data.SAMPLES_DIR / p.name for p in paths]
    for new, old in zip(paths[:2], shipped[:2], strict=True):
        a, b = nib.load(str(new)), nib.load(str(old))
        assert np.allclose(a.affine, b.affine) and a.shape == b.shape
    assert np.abs(_read(paths[0]) - _read(shipped[0])).max() < 2e-3  # the same pair, up to CPU arithmetic order
    new_mask, old_mask = _read(paths[1]) > 0, _read(shipped[1]) > 0
    assert (new_mask != old_mask).sum() <= max(2, 0.01 * old_mask.sum())
    new_meta, old_meta = json.loads(paths[2].read_text()), json.loads(shipped[2].read_text())
    assert new_meta.keys() == old_meta.keys()
    for key, value in old_meta.items():
        assert new_meta[key] == (pytest.approx(value, abs=1e-3) if isinstance(value, float) else value), key
    assert sum(p.stat().st_size for p in shipped) < 1_200_000  # small enough to ship in the wheel


def test_generated_samples_carry_their_provenance(make_napari_viewer):
    from napari_neuromf._layers import LESION_NAME

    viewer = make_napari_viewer()
    viewer.open_sample("napari-neuromf", "generated_pair")
    image, lesion = viewer.layers["gen_000 FLAIR"], viewer.layers["gen_000 lesion"]
    assert image.data.shape == lesion.data.shape == (96, 96, 96) and image.data.dtype == np.float32
    assert tuple(image.scale) == tuple(lesion.scale) == (2.0, 2.0, 2.0) and lesion.data.any()
    info = lesion.metadata["neuromf"]
    assert info["seed"] == 0 and info["steps"] == 32 and info["mode"] == "joint" and info["generated"]
    assert info["adapter"] == "embedded (joint_fine + cond_fine)"
    assert dict(zip(lesion.features["index"], lesion.features["name"], strict=True))[1] == LESION_NAME

    viewer.open_sample("napari-neuromf", "conditional_pair")  # a FLAIR for a lesion drawn by the prior
    image, lesion = viewer.layers["cond_000 FLAIR"], viewer.layers["cond_000 lesion"]  # named apart from gen_000
    assert image.data.shape == lesion.data.shape == (96, 96, 96)
    assert lesion.data.any() and lesion.metadata["neuromf"]["mode"] == "conditional"
    assert lesion.metadata["neuromf"]["mask_source"] == "prior"
    assert np.isfinite(image.data).all() and 0.0 <= float(image.data.min())
    # the FLAIR is brighter under its lesion than around it (a conditional FLAIR carries the lesion)
    assert float(image.data[lesion.data > 0].mean()) > float(image.data[image.data > 0.1].mean())


def test_the_recorded_sample_grids_are_the_files_grids():
    """`samples/grids.json` (what File > Open Sample's placeholder layer is made from) holds each sample's first
    layer as it reads now: name, shape, dtype, scale and translate; remade with the samples (`_make_samples`)."""
    from napari_neuromf import _sample_data

    recorded = json.loads(_sample_data.GRIDS_FILE.read_text())
    assert set(recorded) == set(_sample_data.sample_reads()) == set(SAMPLES)
    for key in SAMPLES:
        assert recorded[key] == _sample_data.sample_grid(key), key
        zeros, kwargs, kind = _sample_data._placeholder(key)
        assert kind == "image" and list(zeros.shape) == recorded[key]["shape"] and not zeros.any()
        assert kwargs["name"] == recorded[key]["name"] and list(kwargs["scale"]) == recorded[key]["scale"]


def test_a_missing_premade_pair_says_how_to_make_it(make_napari_viewer, monkeypatch, tmp_path):
    from napari_neuromf import _sample_data

    monkeypatch.setattr(_sample_data, "SAMPLES_DIR", tmp_path)
    with pytest.raises(_sample_data.SampleDataError, match="python -m napari_neuromf._make_samples"):
        _sample_data.generated_pair()
