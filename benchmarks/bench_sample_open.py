"""How long napari's GUI thread is held when a volume opens: two versions of the plugin side by side in one run.

Each version (`--before REV`: that commit's `napari_neuromf`, taken with `git archive`; `after`: this working
tree) runs in its own napari process, the two interleaved round by round (order swapped every round) so drifting
machine load hits both alike. In each process, after napari's own first use (an image, a labels and a text
points layer added and cleared), each action runs `--opens` times into an empty viewer, through napari's own GUI
entry points (`QtViewer._qt_open`, the sample menu's `_add_sample`) from inside a running Qt event loop, as in
the app:

- `first_sample` (or `first_file_open` with `--first file_open`): once per process, the viewer's first NeuroMF
  opening, File > Open Sample > the phantom case (File > Open of its FLAIR) into the viewer napari was first used
  in (2D dims, no NeuroMF text drawn yet; NeuroMF's sample or reader modules load in it);
- `sample`: File > Open Sample > the phantom case (FLAIR + lesion); `pair_sample`: the pre-made generated pair;
- `pair_over_scan`: the generated pair opened over the phantom case (another grid: the pair is shown alone);
- `file_open`: File > Open of the phantom case's FLAIR through NeuroMF's reader; `file_open_pair`: its FLAIR and
  lesion mask opened together (a drop of both files); `file_open_1mm`: the FLAIR resampled to 1 mm (192^3 voxels,
  a clinical scan's size);
- `dock_first_pair`: a generated pair arriving in the Generate dock into an empty viewer, `dock_next_pair`: a
  further one beside it (`--no-dock`: both skipped; the dock imports PyTorch and MONAI first).

Per opening: the longest stretch of GUI-thread CPU time between two ticks of a 10 ms QTimer (the measure of
tests/plugin/test_plugin_samples.py; `time.thread_time`, so other jobs do not stretch it), the second longest
and third longest (the orientation letters come in later turns), and `ours_ms`: GUI-thread CPU time inside the
handlers of NeuroMF's view guard (napari's reactions to what they set included: re-slicing, redraw requests).

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_sample_open.py --before 40ae30b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    compact_json,
    generate_dock_with_pair,
    gui_thread_ticks,
    warmed_napari_viewer,
)

ACTIONS = ("first_sample", "first_file_open", "sample", "pair_sample", "pair_over_scan", "file_open", "file_open_pair",
           "file_open_1mm", "dock_first_pair", "dock_next_pair")
KEYS = ("longest_ms", "second_ms", "third_ms", "ours_ms")


def _measure(opens: int, dock: bool, first: str) -> dict:
    """In the child process: every action `opens` times; per opening the two longest gaps and `ours_ms`."""
    import functools

    from napari_neuromf import _viewing

    ours = {"ms": 0.0, "depth": 0}

    def counted(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            ours["depth"] += 1
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                ours["depth"] -= 1
                if ours["depth"] == 0:  # nested calls counted once
                    ours["ms"] += (time.thread_time() - start) * 1000

        return inner

    for name in ("_inserted", "_letters_after_insert", "refresh", "_follow_slice", "_drop_markers"):
        setattr(_viewing.ViewGuard, name, counted(getattr(_viewing.ViewGuard, name)))

    viewer, spin = warmed_napari_viewer()
    from napari._qt._qplugins._qnpe2 import _add_sample  # what File > Open Sample's items call

    qt_viewer = viewer.window._qt_viewer  # its _qt_open: what File > Open and drag and drop call
    ticks, timer = gui_thread_ticks()
    results: dict[str, list[dict]] = {}

    def measured(name: str, action) -> None:
        spin(300)
        ticks.clear()
        ours["ms"] = 0.0
        spin(100)
        in_running_loop(action, 1000)
        gaps = sorted(((b - a) * 1000 for a, b in zip(ticks, ticks[1:], strict=False)), reverse=True)
        gaps += [0.0] * 3  # a window of fewer ticks: its stretches are all there is
        results.setdefault(name, []).append({"longest_ms": round(gaps[0], 1), "second_ms": round(gaps[1], 1),
                                             "third_ms": round(gaps[2], 1), "ours_ms": round(ours["ms"], 1)})

    # NeuroMF's first opening in this viewer: its sample modules load, the viewer's dims and canvas font are fresh
    from neuromf.weights import sample_data_root  # not NeuroMF's sample or reader modules: they load in the first

    anat = sample_data_root() / "fcd_phantoms" / "sub-00001" / "anat"
    flair, roi = sorted(anat.glob("*FLAIR.nii.gz"))[0], sorted(anat.glob("*FLAIR_roi.nii.gz"))[0]
    if first == "file_open":
        _viewing.prefer_this_reader()  # as a session after any earlier use: napari asks for the reader only once
        measured("first_file_open", lambda: qt_viewer._qt_open([str(flair)], stack=False))
    else:
        measured("first_sample", lambda: _add_sample(qt_viewer, "napari-neuromf", "fcd_phantom_case"))
    fine = _one_mm_copy(flair)
    actions = {"sample": lambda: _add_sample(qt_viewer, "napari-neuromf", "fcd_phantom_case"),
               "pair_sample": lambda: _add_sample(qt_viewer, "napari-neuromf", "generated_pair"),
               "pair_over_scan": lambda: _add_sample(qt_viewer, "napari-neuromf", "generated_pair"),
               "file_open": lambda: qt_viewer._qt_open([str(flair)], stack=False),
               "file_open_pair": lambda: qt_viewer._qt_open([str(flair), str(roi)], stack=False),
               "file_open_1mm": lambda: qt_viewer._qt_open([str(fine)], stack=False)}
    setups = {"pair_over_scan": lambda: viewer.open_sample("napari-neuromf", "fcd_phantom_case")}  # not timed
    if dock:
        widget, pair = generate_dock_with_pair(viewer, spin)
        actions["dock_first_pair"] = actions["dock_next_pair"] = lambda: widget._on_pair(pair)
    for _ in range(opens):
        for name, action in actions.items():
            if name != "dock_next_pair":  # a further pair arrives beside the first
                viewer.layers.clear()
            if name in setups:
                setups[name]()
            measured(name, action)
    timer.stop()
    viewer.close()
    import qtpy

    return {"results": results, "qt_binding": f"{qtpy.API_NAME} {qtpy.QT_VERSION}"}


def in_running_loop(action, ms: float) -> None:
    """Call `action` from inside a running Qt event loop, as napari's menus and drag and drop do in the app (a
    reader can tell), and keep the loop running `ms` milliseconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(0, action)
    QTimer.singleShot(int(ms), loop.quit)
    loop.exec()


def _one_mm_copy(flair: Path) -> Path:
    """The FLAIR resampled to 1 mm voxels (a clinical scan's size: 192^3 from the 3 mm phantom), in a temporary
    folder, for the reading part of an opening."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import zoom

    img = nib.load(flair)
    factor = float(np.mean(img.header.get_zooms()[:3]))
    affine = img.affine.copy()
    affine[:3, :3] /= factor
    out = Path(tempfile.mkdtemp()) / "fine_FLAIR.nii.gz"
    nib.save(nib.Nifti1Image(zoom(np.asarray(img.dataobj, np.float32), factor, order=1), affine), out)
    return out


def _tree_of(rev: str, into: Path) -> Path:
    """`rev`'s napari_neuromf package, unpacked into `into` (the backend is this tree's: the plugin is compared)."""
    archive = into / "plugin.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, "napari_neuromf"], cwd=REPO_ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_child(plugin_root: Path, opens: int, dock: bool, first: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_root), str(REPO_ROOT / "backend"), str(REPO_ROOT)])
    command = [sys.executable, __file__, "--child", "--opens", str(opens), "--first", first]
    done = subprocess.run(command + ([] if dock else ["--no-dock"]), env=env, capture_output=True, text=True,
                          timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"child for {plugin_root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "samples": [round(v, 1) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="a044b4c", help="git revision of the plugin to compare with")
    parser.add_argument("--rounds", type=int, default=2, help="processes per version, interleaved")
    parser.add_argument("--opens", type=int, default=3, help="openings of each action per process")
    parser.add_argument("--no-dock", dest="dock", action="store_false", help="skip the Generate dock's pair")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_sample_open.json")
    parser.add_argument("--first", choices=("sample", "file_open"), default="sample",
                        help="each process's first NeuroMF opening: File > Open Sample or File > Open")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.opens, args.dock, args.first)))
        return

    started, load_start = time.time(), [round(x, 2) for x in os.getloadavg()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                            capture_output=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                text=True, capture_output=True).stdout.strip())
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench_sample_open_") as tmp:
        roots = {"before": _tree_of(args.before, Path(tmp)), "after": REPO_ROOT}
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for version in order:
                runs[version].append(_run_child(roots[version], args.opens, args.dock, args.first))
                print(f"round {round_ + 1}/{args.rounds}: {version} done", file=sys.stderr)
    timing: dict[str, dict] = {}
    for version, children in runs.items():
        timing[version] = {}
        for action in ACTIONS:
            rows = [row for child in children for row in child["results"].get(action, [])]
            if rows:
                timing[version][action] = {key: _summary([row[key] for row in rows])
                                           for key in KEYS}
    ratios = {action: round(timing["after"][action]["longest_ms"]["median"]
                            / timing["before"][action]["longest_ms"]["median"], 3)
              for action in timing["after"] if action in timing["before"]}
    result = {"what": "GUI-thread CPU stretches (ms) when a volume opens, two plugin versions side by side",
              "method": "longest and second-longest gap between two ticks of a 10 ms QTimer, time.thread_time; "
                        f"{args.rounds} processes per version interleaved (order swapped each round), "
                        f"{args.opens} openings of each action per process into an empty viewer (first_sample or "
                        "first_file_open: once, "
                        "the process's first NeuroMF opening); napari's own first use paid before measuring",
              "versions": {"before": args.before, "after": f"{commit}{' (uncommitted changes)' if dirty else ''}"},
              "timing_ms": timing, "ratios_longest_after_over_before": ratios,
              "env": {"qt_binding": runs["after"][0]["qt_binding"], "cpu_count": os.cpu_count(),
                      "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                      "wall_s": round(time.time() - started, 1),
                      "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(compact_json(result) + "\n")
    print(json.dumps({"timing_ms": {v: {a: {k: t[k]["median"] for k in t} for a, t in acts.items()}
                                    for v, acts in timing.items()}, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
