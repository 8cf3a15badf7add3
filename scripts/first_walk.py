"""A user's first walk, timed: File > Open a FLAIR -> Generate with the defaults -> Side by side -> Save.

Run from a fresh clone under a virtual display (docs/user_guide_walk.md gives the figures of one run):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/first_walk.py

It drives the real napari window and the Generate dock as a user would (the dock's own buttons' methods), with a
fresh user folder and data cache, and writes:

- ``docs/first_walk.json``: wall-clock seconds of each step, the machine (CPU, cores, torch threads) and its load
  average at the start and the end (timings on a busy machine are upper bounds), and every 5 s of the generation
  the time left the dock said (at the run's own pace) against the time it actually took from there;
- ``docs/walk_generate.png``: the Generate dock after the pair arrived (its lesion figures and the lesion check's
  verdict in the pair list, the expected time);
- ``docs/walk_side_by_side.png``: the side-by-side window, the real case (left) and the generated pair (right).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot import save_palette_png  # noqa: E402  (the same 256-colour PNGs as the other screenshots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--case", default="sub-00001", help="the phantom case opened with File > Open")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--steps", type=int, default=None, help="a quick check of the script: fewer network steps "
                                                                 "than the defaults (not the walk)")
    parser.add_argument("--pair-from-sample", action="store_true",
                        help="no generation: open the pre-made 'Generated pair' sample (made with the defaults) "
                             "instead, for the pictures and the other steps' timings on a machine that cannot spare "
                             "the minutes of a 2 mm pair")
    parser.add_argument("--home", type=Path, default=None,
                        help="the walk's folder (user folder, data cache, saved pairs), kept: a second walk given "
                             "the first one's folder is a returning user, whose estimates follow the pace the first "
                             "walk recorded (default: a fresh temporary folder, a first-time user)")
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="neuromf_walk_"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["NEUROMF_HOME"] = str(home / "home")  # a user who never ran NeuroMF: nothing remembered
    os.environ["NEUROMF_DATA"] = str(home / "data")  # and no generated data set in the cache
    timings: dict[str, float] = {}
    started = time.perf_counter()
    load_start = os.getloadavg()

    import napari
    from qt_driver import QtDriver, hide_qt_binding_toast
    from qtpy.QtWidgets import QApplication

    hide_qt_binding_toast()
    app = QApplication.instance() or QApplication(sys.argv)

    driver = QtDriver(app, args.timeout, "first walk")
    pump, until = driver.pump, driver.until

    t = time.perf_counter()
    viewer = napari.Viewer(title="NeuroMF", show=True)
    viewer.window.resize(1600, 1000)
    pump(0.5)
    timings["napari_start_s"] = time.perf_counter() - t

    from napari_neuromf._sample_data import phantom_case_paths
    from napari_neuromf._viewing import MARKERS_NAME, prefer_this_reader

    flair, _ = phantom_case_paths(args.case)
    t = time.perf_counter()
    prefer_this_reader()  # what a first use of the plugin sets; a napari that never saw NeuroMF asks once instead
    viewer.window._qt_viewer._qt_open([str(flair)], stack=False)  # File > Open
    until(lambda: MARKERS_NAME in viewer.layers and viewer.layers[MARKERS_NAME].visible, "File > Open")  # letters shown
    timings["file_open_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _, generate = viewer.window.add_plugin_dock_widget("napari-neuromf", "Generate")
    until(lambda: generate.ready, "the Generate dock's defaults (backend import)")
    timings["generate_dock_ready_s"] = time.perf_counter() - t
    pump(0.5)
    expected = generate.estimate.text()

    if args.steps is not None:
        generate.steps.setValue(args.steps)
    t = time.perf_counter()
    if args.pair_from_sample:
        viewer.open_sample("napari-neuromf", "generated_pair")
        until(lambda: "lesion" in viewer.layers["gen_000 FLAIR"].metadata["neuromf"], "the sample pair's figures")
        timings["sample_pair_with_figures_s"] = time.perf_counter() - t
    else:
        generate.start()  # the defaults, untouched
        said: list[tuple[float, float, str]] = []  # (clock, time left the dock says, at which step)

        def finished() -> bool:
            run = generate.run
            left = None if run is None else run.time_left_s()
            if left is not None and (not said or time.perf_counter() - said[-1][0] >= 5.0):
                said.append((time.perf_counter(), left, f"pass {run.passes} step {run.step[0]} / {run.step[1]}"))
            return not generate.busy

        until(finished, "Generate")
        end = time.perf_counter()
        run = generate.run
        timings["generate_s"] = end - t
        time_left = [{"at_s": round(at - t, 1), "step": step, "said_left_s": round(left, 1),
                      "actual_left_s": round(end - at, 1)} for at, left, step in said]
        timings["generate_models_loaded_s"] = run.loaded_s
        if run.failure is not None:
            raise RuntimeError(run.failure.message)
    pair = next(layer for layer in viewer.layers if layer.name.endswith("FLAIR") and layer.name.startswith("gen_"))
    figures = pair.metadata["neuromf"]["lesion"]
    lesion = viewer.layers[pair.name.replace("FLAIR", "lesion")]
    lesion.contour = 1
    if lesion.data.any():
        import numpy as np

        centre = np.argwhere(lesion.data > 0).mean(axis=0)
        viewer.dims.set_point(2, float(lesion.data_to_world(centre)[2]))
    generate.pairs.item(0).setSelected(True)
    viewer.title = "NeuroMF: File > Open, then Generate with the defaults"
    pump(1.0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_palette_png(viewer.screenshot(canvas_only=False, flash=False), args.out_dir / "walk_generate.png")

    t = time.perf_counter()
    generate.real_case.value = viewer.layers[flair.name.replace(".nii.gz", "")]
    generate.compare()
    until(lambda: generate.compare_viewer is not None, "Side by side")
    timings["side_by_side_s"] = time.perf_counter() - t
    other = generate.compare_viewer
    other.window.resize(1400, 800)
    pump(1.0)
    save_palette_png(other.screenshot(canvas_only=False, flash=False), args.out_dir / "walk_side_by_side.png")

    t = time.perf_counter()
    pairs_dir = home / f"pairs_{time.strftime('%H%M%S')}"  # a returning user's walk saves beside the first's
    generate.out_dir.setText(str(pairs_dir))
    generate.save_pairs()
    until(lambda: not generate.busy, "Save pairs")
    timings["save_s"] = time.perf_counter() - t
    saved = sorted(p.name for p in pairs_dir.iterdir())
    timings["total_s"] = time.perf_counter() - started

    import torch

    from neuromf.estimates import pace_file

    report = {"pair_from": "the pre-made Generated pair sample" if args.pair_from_sample else "Generate (defaults)",
              "timings_s": {key: round(value, 1) for key, value in timings.items()},
              "expected_before_start": expected, "pair": figures, "saved": saved,
              "machine_pace_after": json.loads(pace_file().read_text()) if pace_file().is_file() else None,
              "time_left_said_during_generation": [] if args.pair_from_sample else time_left,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "loadavg_start": [round(x, 2) for x in load_start],
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out_dir / "first_walk.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    other.close()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
