"""Clinical viewing: axial slices in radiological (or neurological) convention, with orientation labels.

Every volume this plugin adds is in canonical RAS order (``_layers``): array axis 0 runs toward the patient's
Right, axis 1 toward Anterior, axis 2 toward Superior. An axial view slices along S and shows A vertically and R
horizontally. napari's camera orientation says which way each displayed axis increases on screen:

- radiological: anterior up, patient right on screen LEFT (as if looking up from the patient's feet);
- neurological: anterior up, patient right on screen RIGHT (looking down from above the head).

In 3D the depth axis (S) is set so that the view is a rotation, not a mirror image, of the patient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

RADIOLOGICAL, NEUROLOGICAL = "radiological", "neurological"
CONVENTIONS = (RADIOLOGICAL, NEUROLOGICAL)
AXIS_LABELS = ("R", "A", "S")  # the direction in which each canonical axis increases
AXIAL_ORDER = (2, 1, 0)  # slice along S; rows = A, columns = R
# (depth, vertical, horizontal) directions in which S, A and R increase on screen
ORIENTATIONS = {RADIOLOGICAL: ("away", "up", "left"), NEUROLOGICAL: ("towards", "up", "right")}
CAPTIONS = {RADIOLOGICAL: "Axial · radiological\nscreen left = patient Right (R), right = Left (L)\n"
                          "top = Anterior (A), bottom = Posterior (P)",
            NEUROLOGICAL: "Axial · neurological\nscreen left = patient Left (L), right = Right (R)\n"
                          "top = Anterior (A), bottom = Posterior (P)"}


def show_axial(viewer: napari.Viewer, convention: str = RADIOLOGICAL) -> None:
    """Axial view of 3D layers in ``convention``, with R/A/S labels on the dims and the orientation written in a
    corner of the canvas (napari's axes arrows would sit at the world origin, i.e. in the middle of the brain)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if viewer.dims.ndim != 3:  # only volumes have an anatomical orientation to show
        return
    viewer.dims.axis_labels = AXIS_LABELS
    viewer.dims.order = AXIAL_ORDER
    viewer.scene.camera.orientation = ORIENTATIONS[convention]
    caption = viewer.canvas.overlays.text
    caption.text = CAPTIONS[convention]
    caption.position = "top_left"
    caption.visible = True


def current_convention(viewer: napari.Viewer) -> str | None:
    """The convention the viewer shows now (None when it is not one of ours, e.g. the user rotated it)."""
    orientation = tuple(str(o) for o in viewer.scene.camera.orientation)
    if tuple(viewer.dims.order) != AXIAL_ORDER:
        return None
    return next((name for name, value in ORIENTATIONS.items() if value[1:] == orientation[1:]), None)
