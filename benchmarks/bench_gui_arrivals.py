"""How long napari's GUI thread is held when results arrive: a sample opened, a generated pair added by the dock.

For each action the longest stretch of GUI-thread CPU time between two ticks of a 10 ms QTimer (the measure of
tests/plugin/test_plugin_samples.py), the action's own first drawing included; CPU time of the thread
(`time.thread_time`), so other jobs on the machine do not stretch it. napari's own first use in the process is
paid before measuring. Actions, each `--repeats` times into a fresh viewer state:

- `first_sample`: the phantom case, the first NeuroMF use of the session (module imports, the reader preference);
- `sample`: the phantom case again into an empty viewer; `pair_sample`: the pre-made generated pair;
- `file_open`: File > Open of the phantom case's FLAIR (one file through NeuroMF's reader) into an empty viewer;
- `dock_first_pair`: a generated pair arriving in the Generate dock into an empty viewer (it turns the view axial);
- `dock_next_pair`: a further pair arriving beside it.

Run under a virtual display: `xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_gui_arrivals.py`.
Compare two versions by running it on each (the JSON names the git commit and the Qt binding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    RESULTS_DIR,
    environment,
    generate_dock_with_pair,
    gui_thread_ticks,
    warmed_napari_viewer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_gui_arrivals.json")
    args = parser.parse_args()

    import qtpy

    viewer, spin = warmed_napari_viewer()
    ticks, timer = gui_thread_ticks()

    def longest_gap_ms(action) -> float:
        ticks.clear()
        spin(100)
        action()
        spin(600)
        return max((b - a) * 1000 for a, b in zip(ticks, ticks[1:], strict=False))

    samples: dict[str, list[float]] = {name: [] for name in ("first_sample", "sample", "pair_sample", "file_open",
                                                             "dock_first_pair", "dock_next_pair")}
    samples["first_sample"].append(longest_gap_ms(lambda: viewer.open_sample("napari-neuromf", "fcd_phantom_case")))

    from napari_neuromf._sample_data import phantom_case_paths

    flair, _ = phantom_case_paths()
    widget, pair = generate_dock_with_pair(viewer, spin)
    for _ in range(args.repeats):
        for name, sample in (("sample", "fcd_phantom_case"), ("pair_sample", "generated_pair")):
            viewer.layers.clear()
            spin(200)
            samples[name].append(longest_gap_ms(lambda sample=sample: viewer.open_sample("napari-neuromf", sample)))
        viewer.layers.clear()
        spin(200)
        samples["file_open"].append(longest_gap_ms(lambda: viewer.open(str(flair), plugin="napari-neuromf")))
        viewer.layers.clear()
        spin(200)
        samples["dock_first_pair"].append(longest_gap_ms(lambda: widget._on_pair(pair)))
        samples["dock_next_pair"].append(longest_gap_ms(lambda: widget._on_pair(pair)))
    timer.stop()
    env = environment("cpu")
    env["qt_binding"] = f"{qtpy.API_NAME} {qtpy.QT_VERSION}"
    result = {"what": "longest GUI-thread CPU gap (ms) between two ticks of a 10 ms timer around each action",
              "timing_ms": {name: {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
                                   "samples": [round(v, 1) for v in values]} for name, values in samples.items()},
              "env": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["timing_ms"], indent=2))
    viewer.close()


if __name__ == "__main__":
    main()
