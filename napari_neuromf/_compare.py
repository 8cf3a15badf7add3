"""Side by side: a real case | a generated pair, on one grid, with one slice position for both.

A generated pair lies on its adapter's model grid, centred on the origin of the world (it has no scanner). To
compare like with like, the real case is brought onto that same grid exactly as training sees it
(`neuromf.io.nifti.arrays_to_model_grid`: the window centred on its brain, intensities scaled like the training
FLAIRs) and placed on the same world coordinates; both then show the same axial level of their brain's window at
one slice position, in the same grey window. They open in a second viewer in napari's grid mode (one viewbox
per volume, its lesion and its own R/L/A/P letters; cameras and slice shared), so the user's own layers stay as
they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari


@dataclass
class Comparison:
    """The four volumes of a side-by-side view: the real FLAIR (+ lesion) and the generated FLAIR + lesion, all
    on the generated pair's grid (shape and world placement)."""

    real_name: str
    pair_name: str
    real_image: np.ndarray
    real_lesion: np.ndarray | None
    image: np.ndarray
    lesion: np.ndarray
    affine: np.ndarray  # the shared grid's (4, 4) RAS affine
    info: dict[str, Any]


def model_grid_of(pair_info: dict[str, Any], image_state: dict) -> Any:
    """The `Preprocessing` of the adapter that drew a generated pair (intensity scaling), on that pair's grid."""
    from neuromf.io.nifti import Preprocessing
    from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir

    adapter = pair_info.get("checkpoint") or pair_info.get("adapter")
    mode = "conditional" if pair_info.get("mode") == "conditional" else "joint"
    prep = AdapterMeta.load(resolve_adapter_dir(adapter, mode)).prep
    values = {**prep.key(), "shape": [int(n) for n in image_state["shape"]],
              "spacing": [float(s) for s in image_state["scale"]]}
    return Preprocessing.from_dict(values)


def build_comparison(real: tuple[Any, dict], real_lesion: tuple[Any, dict] | None, pair: tuple[Any, dict],
                     pair_lesion: tuple[Any, dict]) -> Comparison:
    """Worker body: each argument a (data, layer state) snapshot; the real case resampled onto the pair's grid.

    Raises ValueError for an inpainted pair (it lies on its scan's grid, already beside its real scan)."""
    from napari_neuromf._layers import nifti_from_layer, world_placement
    from neuromf.generation.images import model_grid_affine
    from neuromf.io.nifti import arrays_to_model_grid

    info = (pair[1].get("metadata") or {}).get("neuromf") or {}
    if info.get("mode") == "inpaint":
        raise ValueError(f"{info.get('pair')} is inpainted into a scan: it lies on that scan's grid; compare it "
                         "with the scan itself")
    image_data, image_state = np.asarray(pair[0]), {**pair[1], "shape": np.shape(pair[0])}
    prep = model_grid_of(info, image_state)
    scan = nifti_from_layer(np.asarray(real[0]), real[1])
    mask = None
    if real_lesion is not None:
        mask_image = nifti_from_layer((np.asarray(real_lesion[0]) > 0).astype(np.uint8), real_lesion[1])
        if mask_image.shape != scan.shape:
            raise ValueError(f"{real_lesion[1].get('name')!r} is not on the grid of {real[1].get('name')!r}")
        mask = np.asarray(mask_image.dataobj)
    image_volume, mask_volume = arrays_to_model_grid(np.asarray(scan.dataobj, dtype=np.float32), scan.affine, mask,
                                                     prep, source=f"layer {real[1].get('name')!r}")
    affine = model_grid_affine(prep.shape, prep.spacing)
    scale, translate = world_placement(affine)
    if not (np.allclose(scale, pair[1]["scale"]) and np.allclose(translate, pair[1]["translate"])):
        affine = np.diag([*map(float, pair[1]["scale"]), 1.0])  # a pair placed elsewhere: follow its layer
        affine[:3, 3] = [float(t) for t in pair[1]["translate"]]
    return Comparison(str(real[1].get("name")), str(info.get("pair") or pair[1].get("name")),
                      image_volume.data[0].numpy(), None if mask_volume is None else
                      mask_volume.data[0].numpy().astype(np.uint8), image_data,
                      np.asarray(pair_lesion[0]).astype(np.uint8), affine, info)


def show_comparison(viewer: napari.Viewer, comparison: Comparison) -> list:
    """Real | generated in ``viewer`` (a fresh one): grid mode, one viewbox each (FLAIR + lesion + R/L/A/P
    letters), axial radiological, one grey window for both FLAIRs; returns the volume layers, left to right."""
    from napari_neuromf._layers import brain_window, layer_tuple
    from napari_neuromf._viewing import (
        MARKERS_NAME,
        add_letters,
        go_to_lesion,
        marker_positions,
        show_axial,
        view_guard,
    )

    view_guard(viewer)
    grid = viewer.canvas.grid
    # each viewbox: FLAIR, lesion and its own R/L/A/P letters (grid mode before any layer: the guard's single
    # letters layer would take a viewbox of its own, so it is never made here)
    grid.stride, grid.shape, grid.enabled = 3, (1, 2), True
    window = brain_window(comparison.real_image)
    lesion = np.zeros(comparison.image.shape, np.uint8) if comparison.real_lesion is None else comparison.real_lesion
    real = comparison.real_name
    real_lesion = real.replace("FLAIR", "lesion") if "FLAIR" in real else f"{real} lesion"
    layers = []
    for names, image, mask in (((f"{real} (model grid)", f"{real_lesion} (model grid)"), comparison.real_image,
                                lesion),
                               ((f"{comparison.pair_name} FLAIR", f"{comparison.pair_name} lesion"), comparison.image,
                                comparison.lesion)):
        data, kwargs, _ = layer_tuple(image, comparison.affine, names[0], "image", extra={"compared": True})
        kwargs["contrast_limits"] = window
        layers.append(viewer.add_image(data, **kwargs))
        data, kwargs, _ = layer_tuple(mask, comparison.affine, names[1], "labels", extra={"compared": True})
        layers.append(viewer.add_labels(data, **kwargs))
        box = layers[-2].extent.world  # (lo, hi) of the shared grid
        add_letters(viewer, marker_positions(box[0], box[1], float(viewer.dims.point[2])),
                    name=f"{MARKERS_NAME} ({'real' if len(layers) == 2 else 'generated'})", grid_box=True)
    show_axial(viewer)
    labelled = layers[1] if comparison.real_lesion is not None and comparison.real_lesion.any() else layers[3]
    if np.any(labelled.data):
        go_to_lesion(viewer, labelled)
    view_guard(viewer).fit_to()
    viewer.layers.selection.active = layers[2]  # the generated FLAIR: its contrast controls first
    return layers


__all__ = ["Comparison", "build_comparison", "model_grid_of", "show_comparison"]
