"""README screenshot: a generated FLAIR + lesion pair overlaid in napari, with the Generate widget docked.

Run under a virtual display (no screen needed):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot.py

It samples one pair from the adapter given with --adapter (default: the embedded demo adapter of --mode: joint =
lora_demo, conditional = cond_demo, which draws the lesion from its prior of training lesions). When no adapter is
available yet it falls back to the FCD phantom sample case, and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def pair_layers_or_phantom(adapter: str, seed: int, steps: int, mode: str = "joint") -> tuple[list, str]:
    from napari_neuromf._layers import case_layers, pair_layers

    try:
        if mode == "conditional":
            from neuromf.pipelines.conditional import generate_conditional_pairs as generate
        else:
            from neuromf.pipelines.lora import generate_pairs as generate

        pair = next(iter(generate(adapter, n=1, steps=steps, seed=seed, device="auto")))
        meta = {**pair.meta, "generated": True, "seed": seed, "steps": steps, "checkpoint": adapter}
        return (pair_layers("gen_000", pair.image, pair.mask, pair.affine, meta),
                f"generated pair, {mode} mode ({adapter})")
    except Exception as err:  # no adapter yet: show the phantom case instead
        print(f"screenshot: cannot generate from {adapter!r} ({type(err).__name__}: {err}); "
              "using the FCD phantom sample case instead", file=sys.stderr)
    from napari_neuromf._sample_data import PHANTOM_CASE, phantom_case_paths

    image, mask = phantom_case_paths()
    layers, _ = case_layers(image, mask, PHANTOM_CASE)
    return layers, f"phantom case {PHANTOM_CASE}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="embedded", help="adapter folder or 'embedded'")
    parser.add_argument("--mode", default="joint", choices=["joint", "conditional"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 900), metavar=("W", "H"))
    args = parser.parse_args(argv)

    import napari

    try:  # keep napari's one-off "PyQt5 is deprecated" toast out of the picture
        import napari._qt.qt_main_window as qt_main_window

        qt_main_window.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass

    from napari_neuromf._widgets import add_layer

    layers, what = pair_layers_or_phantom(args.adapter, args.seed, args.steps, args.mode)
    viewer = napari.Viewer(title="NeuroMF", show=True)
    viewer.window.resize(*args.size)
    _, generate_widget = viewer.window.add_plugin_dock_widget("napari-neuromf", "Generate")
    generate_widget.mode.setCurrentText(args.mode)
    generate_widget.seed.setValue(args.seed)
    added = [add_layer(viewer, t) for t in layers]
    lesion = next(layer for layer in added if isinstance(layer, napari.layers.Labels))
    image = next(layer for layer in added if isinstance(layer, napari.layers.Image))
    # a window from brain percentiles keeps the hyperintensity visible; the lesion as a contour shows what is
    # under it
    brain = image.data[image.data > 0.05]
    if brain.size:
        image.contrast_limits = (0.0, float(np.percentile(brain, 99.9)))
    lesion.contour = 1
    lesion.opacity = 1.0

    # axial slice through the lesion's centre, anterior up
    viewer.dims.axis_labels = ("R", "A", "S")
    viewer.dims.order = (2, 1, 0)
    voxels = np.argwhere(lesion.data > 0)
    centre = voxels.mean(axis=0) if len(voxels) else np.array(lesion.data.shape) / 2
    world = lesion.data_to_world(centre)
    viewer.dims.set_point(2, float(world[2]))
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    camera.orientation = ("towards", "up", "right")
    viewer.reset_view()
    viewer.title = f"NeuroMF: {what}"
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    print(f"screenshot: {what} -> {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
