"""Clinical viewing: axial slices in radiological (or neurological) convention, with orientation labels.

Every volume this plugin adds is in canonical RAS order (``_layers``): array axis 0 runs toward the patient's
Right, axis 1 toward Anterior, axis 2 toward Superior. An axial view slices along S and shows A vertically and R
horizontally. napari's camera orientation says which way each displayed axis increases on screen:

- radiological: anterior up, patient right on screen LEFT (as if looking up from the patient's feet);
- neurological: anterior up, patient right on screen RIGHT (looking down from above the head).

In 3D the depth axis (S) is set so that the view is a rotation, not a mirror image, of the patient.

Every way a volume reaches the viewer (File > Open and drag and drop through the reader, File > Open Sample, the
widgets) installs one ``ViewGuard`` per viewer. It turns the first volume axial in the chosen convention, keeps
the caption true to what is displayed (hidden as soon as the view is not one of ours, or no volume is open) and
keeps R/L and A/P letters just inside the volume's edges. The letters are a small Points layer with text, not a
canvas overlay: napari has one text overlay (the caption) and it sits at canvas corners; points placed at the
patient's right/left/anterior/posterior side of the volume stay at the image edges under zoom, pan and flips,
and they are right by construction whatever the camera does, since they mark anatomy, not the screen. In napari's
running app the caption first shows once its glyphs are loaded (`_canvas_text`, a few per turn of the event loop),
and a first volume napari inserts hidden (a sample's) is turned axial in its opening's next step: the first opening
of a session does not hold the GUI for either.

The view is fitted to the volumes when they open; napari keeps the zoom when the canvas changes size (a dock
opened beside it, the window resized), which would cut the image and its R/L letters at the canvas's edges. So
while the view is still the last fit (the guard's, a widget's or napari's home button), a new canvas size fits it
again; once the user zoomed or panned, the view is theirs, and the letters move inside the visible part of the
canvas instead (a margin of `MARKER_MARGIN_PX` screen pixels), as a radiology viewer keeps its side markers at
the viewport's edges.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

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


def show_axial(viewer: napari.Viewer, convention: str = RADIOLOGICAL, letters: bool = True) -> None:
    """Axial view of 3D layers in ``convention``, with R/A/S labels on the dims and the orientation written in a
    corner of the canvas (napari's axes arrows would sit at the world origin, i.e. in the middle of the brain);
    ``letters``: place the orientation letters now (the ViewGuard places them after an insertion itself)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if viewer.dims.ndim != 3:  # only volumes have an anatomical orientation to show
        return
    guard = view_guard(viewer)
    guard.convention = convention
    viewer.dims.axis_labels = AXIS_LABELS
    viewer.dims.order = AXIAL_ORDER
    viewer.scene.camera.orientation = ORIENTATIONS[convention]
    guard.refresh(add_letters=letters)


def ready_for_volume(viewer: napari.Viewer, convention: str = RADIOLOGICAL) -> None:
    """An empty 2D viewer given three dims in the axial view of ``convention``; a no-op otherwise. napari turns an
    empty viewer's dims from 2D to 3D inside the call that adds its first volume (a slider widget per axis, the
    slice slider shown, so the canvas is resized and redrawn), and the view is turned axial in the same call: on a
    2-core CPU about a third of a sample opening's stretch (docs/user_guide_walk.md, "An emptied viewer ready for
    the next volume"). Made ready beforehand, the insertion only sets the dims' ranges. The slice slider shows
    while the viewer is empty (three steps, napari's default range)."""
    if len(viewer.layers) or viewer.dims.ndim != 2 or viewer.dims.ndisplay != 2:
        return
    viewer.dims.ndim = 3
    show_axial(viewer, convention, letters=False)


def napari_view(viewer: napari.Viewer) -> None:
    """napari's own view of its dims: axes in their order, default labels, the camera's default orientation (for
    data that is not a volume of ours, shown where one was)."""
    from napari.components.camera import Camera

    viewer.dims.order = tuple(range(viewer.dims.ndim))
    viewer.dims.axis_labels = viewer.layers.axis_labels
    viewer.scene.camera.orientation = Camera().orientation


def viewer_window_open(viewer: napari.Viewer) -> bool:
    """Whether ``viewer``'s window is still open (``Viewer.close`` removes its layers, then deletes its window)."""
    return getattr(getattr(unproxied(viewer), "window", None), "_qt_window", None) is not None


def current_convention(viewer: napari.Viewer) -> str | None:
    """The convention the viewer shows now (None when it is not one of ours, e.g. the user rotated it)."""
    orientation = tuple(str(o) for o in viewer.scene.camera.orientation)
    if tuple(viewer.dims.order) != AXIAL_ORDER:
        return None
    return next((name for name, value in ORIENTATIONS.items() if value[1:] == orientation[1:]), None)


MARKERS_NAME = "orientation letters"
GRID_LETTERS = "neuromf_grid_letters"  # metadata key of a grid viewbox's own letters (`add_letters`)
MARKER_LETTERS = ("R", "L", "A", "P")
VIEW_TEXT = "".join(CAPTIONS.values()) + "".join(MARKER_LETTERS)  # every character the guard draws on the canvas
# inside the volume's edge, as a fraction of its extent: on the field of view's margin (air in a head scan), so the
# letters are on screen whenever the image is (a zoom that fits the image can cut off anything beyond it)
MARKER_MARGIN = 0.06
EMPTY_READY_MS = 30  # a viewer emptied of its volumes is made ready for the next a turn of the event loop later
LETTERS_DELAY_MS = 50  # the letters wait this long after the last volume of an opening: a turn of the event loop
MARKER_MARGIN_PX = 20  # the letters' centres stay this far inside the visible canvas (text of 16 px, centred)
CAMERA_FOLLOW_MS = 50  # at most one move of the letters per this many ms while the camera zooms or pans


def add_letters(viewer: napari.Viewer, positions: np.ndarray, name: str = MARKERS_NAME, visible: bool = True,
                grid_box: bool = False) -> Any:
    """The letters R, L, A, P at ``positions`` (`marker_positions`) as a text-only Points layer, a view aid.
    ``grid_box``: one viewbox's own letters in grid mode (the side-by-side window), placed by whoever made them
    and left alone by the `ViewGuard` (which hides its single letters layer in grid mode); both follow the slice.
    The layers selected before stay selected (napari selects a new layer): the layer controls stay the data's (a
    FLAIR's contrast, a lesion's brush), not the letters' point symbols."""
    selected = list(viewer.layers.selection)
    markers = viewer.add_points(
        positions, name=name, size=0.1, face_color="transparent", border_color="transparent", border_width=0,
        features={"letter": list(MARKER_LETTERS)}, metadata={"neuromf_view_aid": True, GRID_LETTERS: grid_box},
        text={"string": "{letter}", "size": 16, "color": "yellow", "anchor": "center"}, visible=visible)
    markers.editable = False
    viewer.layers.selection.clear()
    viewer.layers.selection.update(selected)
    return markers


def unproxied(obj: Any) -> Any:
    """The object behind napari's `PublicOnlyProxy` (what a plugin dock is given as its viewer), else ``obj``. The
    guard, the openings and the canvas text use napari's private API on purpose (documented where they do)."""
    try:
        from napari.utils._proxies import PublicOnlyProxy
    except ImportError:  # a napari without the proxy: docks get the viewer itself
        return obj
    return obj.__wrapped__ if isinstance(obj, PublicOnlyProxy) else obj


def is_view_aid(layer: Any) -> bool:
    """The orientation letters layer: not data, so never offered as lesion sites, saved or counted as a volume."""
    return bool((getattr(layer, "metadata", None) or {}).get("neuromf_view_aid"))


def is_ras_volume(layer: Any) -> bool:
    """A 3D layer this plugin made from a NIfTI file or a generated pair: canonical RAS order (``_layers``)."""
    metadata = getattr(layer, "metadata", None) or {}
    return getattr(layer, "ndim", 0) == 3 and ("nifti" in metadata or "neuromf" in metadata) \
        and not is_view_aid(layer)


def marker_positions(lo: np.ndarray, hi: np.ndarray, superior: float,
                     visible: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """World positions (R, A, S axes) of the letters R, L, A, P just inside the edges of the box ``lo``..``hi``,
    on the axial plane at ``superior``: R/L at the middle of the A range, A/P at the middle of the R range; with
    ``visible`` (the world box shown on the canvas, less a margin: `visible_box`), moved into it."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    pad, mid = (hi - lo) * MARKER_MARGIN, (lo + hi) / 2
    positions = np.array([[hi[0] - pad[0], mid[1], superior], [lo[0] + pad[0], mid[1], superior],
                          [mid[0], hi[1] - pad[1], superior], [mid[0], lo[1] + pad[1], superior]])
    if visible is not None:
        positions[:, :2] = np.clip(positions[:, :2], visible[0][:2], visible[1][:2])
    return positions


def visible_box(center: tuple[float, float], zoom: float, canvas: tuple[int, int], displayed: tuple[int, int],
                margin_px: float = MARKER_MARGIN_PX) -> tuple[np.ndarray, np.ndarray]:
    """The world box (lo, hi over the 3 axes) a 2D view shows ``margin_px`` screen pixels inside the canvas's edges:
    ``center`` the camera's centre on the ``displayed`` (vertical, horizontal) axes, ``zoom`` screen pixels per
    world unit, ``canvas`` (height, width) in pixels; the axis not displayed is unbounded. Flips of the camera do
    not change it: the box is symmetric about the centre."""
    lo, hi = np.full(3, -np.inf), np.full(3, np.inf)
    for axis, middle, pixels in zip(displayed, center, canvas, strict=True):
        half = max(0.0, pixels / 2 - margin_px) / max(zoom, 1e-12)
        lo[axis], hi[axis] = middle - half, middle + half
    return lo, hi


class ViewGuard:
    """Keeps one viewer's axial view, caption and orientation letters consistent with what it displays.

    ``convention`` is the one a new volume is shown in (the FCD data widget's View choice sets it).
    """

    def __init__(self, viewer: napari.Viewer) -> None:
        self._viewer = weakref.ref(viewer)
        self.convention = RADIOLOGICAL
        self._refreshing = False
        self._fit_pending = False  # a first volume arrived: reset the view once its letters are placed
        self._letters_timer: Any = None  # a QTimer, made on the first insertion (the guard is not a QObject)
        self._letters_new = False  # the letters' layer is made, hidden, and waits for its first showing
        self._letters_hidden = False  # the guard hid the letters (made hidden, or the view not axial): it shows them
        self._camera_timer: Any = None  # a QTimer: the letters follow zoom and pan at most every CAMERA_FOLLOW_MS
        self._fitted: tuple[tuple[float, ...], float] | None = None  # (camera centre, zoom) of the last fit
        self._arrived: list = []  # the volumes of the opening under way (weak references): a pair among them?
        self.alone_note: str | None = None  # what the last pair shown alone hid, and how to show it again
        self._volumes_seen = False  # a volume of ours was shown here: an emptied viewer is made ready for the next
        self._axial_waits = False  # a first volume arrived hidden: turned axial at its opening's next step
        self._glyphs_loading = False  # the canvas text's glyphs are being loaded (`_canvas_text`): the caption waits
        self._glyphs_warmed = False  # a warm-up ran to its end: the caption never waits again (one try per viewer)
        viewer.layers.events.inserted.connect(self._inserted)
        viewer.layers.events.removed.connect(self._removed)
        viewer.dims.events.order.connect(self.refresh)
        viewer.dims.events.ndisplay.connect(self.refresh)
        viewer.dims.events.point.connect(self._follow_slice)
        viewer.scene.camera.events.orientation.connect(self.refresh)
        viewer.scene.camera.events.zoom.connect(self._camera_moved)
        viewer.scene.camera.events.center.connect(self._camera_moved)
        viewer.canvas.events.size.connect(self._canvas_resized)
        viewer.events.reset_view.connect(self._fitted_now)

    @property
    def viewer(self) -> napari.Viewer | None:
        return self._viewer()

    def volumes(self) -> list:
        viewer = self.viewer
        return [] if viewer is None else [layer for layer in viewer.layers if is_ras_volume(layer)]

    def _inserted(self, event: Any) -> None:
        layer, viewer = event.value, self.viewer
        if viewer is None:
            return
        if not is_ras_volume(layer):
            if self._volumes_seen and len(viewer.layers) == 1 and not is_view_aid(layer):
                napari_view(viewer)  # other data into a viewer our volumes left axial (and flipped): napari's view
            return
        self._volumes_seen = True
        volumes = self.volumes()
        fresh = self._needs_axial(volumes)
        from napari_neuromf._opening import adding

        if fresh and not layer.visible and adding(viewer):
            # hidden, and its opening shows it in a later step: turned axial in a turn of its own before that
            # (`axial_if_waiting`), not inside napari's insertion (the first camera turn of a session imports
            # scipy.spatial: ~0.05 s)
            self._axial_waits = True
        elif fresh:
            show_axial(viewer, self.convention, letters=False)
        from napari.layers import Labels

        if isinstance(layer, Labels) and sum(isinstance(v, Labels) for v in volumes) == 1 and np.any(layer.data):
            go_to_lesion(viewer, layer)
        self.refresh()
        self._arrived.append(weakref.ref(layer))
        from qtpy.QtCore import QTimer

        # the letters a little later: after napari has added every layer of this opening (so they go on top without
        # a reorder), and after the event loop has had a turn to draw and take input (a 0 ms timer would run in the
        # same stretch of GUI-thread work: making the letters' layer costs ~0.2 s of its own)
        self._fit_pending = self._fit_pending or fresh
        if self._letters_timer is None:
            self._letters_timer = QTimer()
            self._letters_timer.setSingleShot(True)
            self._letters_timer.setInterval(LETTERS_DELAY_MS)
            self._letters_timer.timeout.connect(self._letters_after_insert)
        self._letters_timer.start()  # restarted by each layer of an opening added a turn apart: after the last

    def _removed(self, *_: Any) -> None:
        self.refresh()
        viewer = self.viewer
        if viewer is not None and len(viewer.layers) == 0 and self._volumes_seen:
            from qtpy.QtCore import QTimer

            QTimer.singleShot(EMPTY_READY_MS, self.ready_for_volume)

    def axial_if_waiting(self) -> None:
        """Turn the view axial for a first volume that arrived hidden (an opening's step, before showing it)."""
        viewer = self.viewer
        if self._axial_waits and viewer is not None:
            self._axial_waits = False
            if self._needs_axial(self.volumes()):
                show_axial(viewer, self.convention, letters=False)

    def _needs_axial(self, volumes: list) -> bool:
        """A first volume, or the user turned the view away from ours: the guard turns it axial."""
        return bool(volumes) and (len(volumes) == 1 or current_convention(self.viewer) is None)

    def warm_glyphs(self) -> None:
        """Load the canvas glyphs of the caption and letters in turns of their own (`_canvas_text`), if an event loop
        runs; the caption shows once they are in."""
        from napari_neuromf._canvas_text import warm_glyphs
        from napari_neuromf._opening import in_gui_event_loop

        viewer = self.viewer
        if viewer is not None and not (self._glyphs_loading or self._glyphs_warmed) and in_gui_event_loop():
            self._glyphs_loading = warm_glyphs(viewer, VIEW_TEXT, self._glyphs_loaded)

    def _glyphs_loaded(self) -> None:
        self._glyphs_loading, self._glyphs_warmed = False, True
        self.refresh()

    def _caption_waits(self) -> bool:
        """Whether the caption, not shown yet, waits for its glyphs: loading in turns of the event loop (started
        here if they are missing). A caption already shown stays; outside an event loop (a script) it never waits:
        its first draw rasterizes them."""
        from napari_neuromf._opening import in_gui_event_loop

        if not in_gui_event_loop() or self.viewer.canvas.overlays.text.visible:
            return False
        self.warm_glyphs()
        return self._glyphs_loading

    def ready_for_volume(self) -> None:
        """The viewer, while empty and open, turned axial in the guard's convention in a turn of its own
        (`ready_for_volume`): after its volumes were removed, or before an opening's first layer."""
        viewer = self.viewer
        if viewer is not None and len(viewer.layers) == 0 and viewer_window_open(viewer):
            ready_for_volume(viewer, self.convention)

    def _letters_after_insert(self) -> None:
        from napari_neuromf._opening import adding

        viewer = self.viewer
        if viewer is None or not self.volumes():
            return
        if adding(viewer):  # layers of the opening still to come, a turn apart: after the last (its own turn)
            self._letters_timer.start()
            return
        self.refresh(add_letters=True)
        self._raise_markers()
        arrived, self._arrived = [ref() for ref in self._arrived], []
        if self._fit_pending:
            self.fit_to()
        self._pair_alone([layer for layer in arrived if layer is not None and layer in viewer.layers])

    def _pair_alone(self, arrived: list) -> None:
        """A whole generated pair opened in one go (File > Open Sample, a reader) over scans on another grid: shown
        alone, as the Generate dock shows the pairs it makes, with a notification saying what was hidden."""
        pairs: dict[str, list] = {}
        for layer in arrived:
            name = (layer.metadata.get("neuromf") or {}).get("pair")
            if name:
                pairs.setdefault(str(name), []).append(layer)
        whole = [layers for layers in pairs.values() if len(layers) == 2]  # its FLAIR and its lesion
        if not whole:
            return
        hidden = show_alone(self.viewer, whole[-1])
        if hidden:
            from napari.utils.notifications import show_info

            show_info(self.alone_note)

    def fit_to(self, layers: list | None = None) -> None:
        """Fit the view to ``layers`` (None: all of them); a fit still pending from the opening before is superseded
        (on a loaded machine its turn can come after this one, and would undo it and any zoom the user made since)."""
        self._fit_pending = False
        self.viewer.reset_view(layers=layers)

    def _fitted_now(self, *_: Any) -> None:
        """napari fitted the view (ours, a widget's, the home button): remember where it put the camera."""
        viewer = self.viewer
        if viewer is not None:
            self._fitted = (tuple(viewer.scene.camera.center), float(viewer.scene.camera.zoom))

    def _still_fitted(self) -> bool:
        """Whether the camera is where the last fit put it (the user has not zoomed or panned since)."""
        viewer = self.viewer
        if viewer is None or self._fitted is None:
            return False
        center, zoom = self._fitted
        return bool(np.allclose(viewer.scene.camera.center, center) and np.isclose(viewer.scene.camera.zoom, zoom))

    def _canvas_resized(self, *_: Any) -> None:
        """A dock opened or closed beside the canvas, or the window was resized: fit the view again while it is
        still the guard's fit (napari keeps the zoom), then the letters follow."""
        viewer = self.viewer
        if self.volumes() and viewer.dims.ndisplay == 2 and self._still_fitted():
            viewer.reset_view()
        self._camera_moved()

    def _camera_moved(self, *_: Any) -> None:
        if self.viewer is None or self._markers() is None:
            return
        if self._camera_timer is None:
            from qtpy.QtCore import QTimer

            self._camera_timer = QTimer()
            self._camera_timer.setSingleShot(True)
            self._camera_timer.setInterval(CAMERA_FOLLOW_MS)
            self._camera_timer.timeout.connect(self.refresh)
        if not self._camera_timer.isActive():  # a throttle, not a debounce: the letters follow a long pan
            self._camera_timer.start()

    def caption_text(self) -> str | None:
        """The caption the view needs now: None when no volume is open or the view is not one of ours."""
        viewer = self.viewer
        if viewer is None or not self.volumes() or viewer.dims.ndisplay != 2:
            return None
        convention = current_convention(viewer)
        return None if convention is None else CAPTIONS[convention]

    def refresh(self, *_: Any, add_letters: bool = False) -> None:
        """Caption and letters after any change of layers, axes order, display or camera orientation; the letters
        layer is made only when a volume arrives (never while layers are being removed, e.g. a viewer closing)."""
        viewer = self.viewer
        if viewer is None or self._refreshing:
            return
        self._refreshing = True
        try:
            caption, text = viewer.canvas.overlays.text, self.caption_text()
            # shown when its glyphs are in, a few turns later: its first draw does not rasterize them
            shown = None if text is not None and self._caption_waits() else text
            if caption.text != (shown or "") or caption.visible != (shown is not None):  # each set redraws: changes
                caption.text = shown or ""
                caption.position = "bottom_left"  # the top centre holds the A letter
                # no background box: napari re-sets a shown box's transform at every layer added, shown or moved,
                # and vispy rebuilds its shader at the next draw (~20-40 ms of each such draw on a 2-core CPU)
                caption.box = False
                caption.visible = shown is not None
            self._place_markers(show=text is not None, add=add_letters)
        finally:
            self._refreshing = False

    def _markers(self) -> Any:
        viewer = self.viewer
        found = [layer for layer in viewer.layers if is_view_aid(layer) and not layer.metadata.get(GRID_LETTERS)]
        return found[0] if found else None

    def _place_markers(self, show: bool, add: bool) -> None:
        viewer, markers = self.viewer, self._markers()
        volumes = self.volumes()
        if not volumes:
            if markers is not None:  # after the removal under way: it may be removing the letters too
                markers.visible = False
                from qtpy.QtCore import QTimer

                QTimer.singleShot(0, self._drop_markers)
            return
        shown = [layer for layer in volumes if layer.visible] or volumes  # hidden scans do not move the letters
        extents = np.array([layer.extent.world for layer in shown])  # (layers, 2, 3)
        lo, hi = extents[:, 0].min(axis=0), extents[:, 1].max(axis=0)
        visible = None
        if viewer.dims.ndisplay == 2:
            visible = visible_box(tuple(viewer.scene.camera.center[-2:]), float(viewer.scene.camera.zoom),
                                  tuple(viewer.canvas.size), tuple(viewer.dims.displayed))
        positions = marker_positions(lo, hi, float(viewer.dims.point[2]), visible)
        show = show and not viewer.canvas.grid.enabled  # in grid mode the letters would take a viewbox of their own
        if markers is None and (not add or not show):
            return
        if markers is None:
            # made hidden and shown a turn later: making the layer (its visual and controls) and its first draw
            # (vispy builds the markers' and text's shaders for each new layer) each cost ~0.1-0.15 s of GUI work
            markers = add_letters(viewer, positions, visible=False)
            self._letters_new = self._letters_hidden = True
            self._show_new_letters_later()
            return
        elif markers.data.shape != positions.shape or not np.allclose(markers.data, positions):
            markers.data = positions
        if markers.visible and not show:
            markers.visible, self._letters_hidden = False, True
        elif show and not markers.visible and self._letters_hidden and not self._letters_new:
            markers.visible, self._letters_hidden = True, False  # letters a user hid (its eye) stay hidden

    def _show_new_letters_later(self) -> None:
        from qtpy.QtCore import QTimer

        QTimer.singleShot(LETTERS_DELAY_MS, self._show_new_letters)

    def _show_new_letters(self) -> None:
        """The new letters' first showing, in a turn of its own: after the layers of the openings under way are
        in (`_opening.adding`), so their first draw does not land in the same stretch as a layer's insertion."""
        from napari_neuromf._opening import adding

        viewer = self.viewer
        if viewer is not None and (adding(viewer) or self._glyphs_loading):  # their glyphs too are loading
            self._show_new_letters_later()
            return
        self._letters_new = False
        self.refresh()

    def _raise_markers(self) -> None:
        viewer, markers = self.viewer, None if self.viewer is None else self._markers()
        if markers is not None and viewer.layers.index(markers) != len(viewer.layers) - 1:
            viewer.layers.move(viewer.layers.index(markers), len(viewer.layers))

    def _drop_markers(self) -> None:
        viewer, markers = self.viewer, None if self.viewer is None else self._markers()
        if markers is not None and not self.volumes():
            viewer.layers.remove(markers)

    def _follow_slice(self, *_: Any) -> None:
        viewer = self.viewer
        for markers in [] if viewer is None else [layer for layer in viewer.layers if is_view_aid(layer)]:
            if len(markers.data) and markers.data[0, 2] != viewer.dims.point[2]:  # text shows on its slice only
                data = np.array(markers.data)
                data[:, 2] = viewer.dims.point[2]
                markers.data = data


def same_grid(a: Any, b: Any) -> bool:
    """Whether two volume layers lie on one grid: the same voxels per axis over the same world box."""
    return np.shape(a.data) == np.shape(b.data) and bool(np.allclose(a.extent.world, b.extent.world, atol=1e-3))


def go_to_lesion(viewer: napari.Viewer, lesion: Any) -> None:
    """The axial slice through the centre of a (non-empty) lesion Labels layer."""
    centre = np.argwhere(np.asarray(lesion.data) > 0).mean(axis=0)
    viewer.dims.set_point(2, float(lesion.data_to_world(centre)[2]))


def show_alone(viewer: napari.Viewer, layers: list) -> list[str]:
    """Show ``layers`` (a generated pair on its model grid) alone: hide, not remove, the visible volumes on another
    grid (a scan opened before: another brain, not registered to the pair, whose larger field of view would show
    around it), fit the view to the pair and go to the slice through its lesion. Returns the names hidden; nothing
    changes when there are none (pairs on one grid stay together); the guard's `alone_note` says what was hidden
    and how to show it again."""
    if not layers:
        return []
    guard = view_guard(viewer)
    hidden = [layer for layer in guard.volumes()
              if layer.visible and layer not in layers and not same_grid(layer, layers[0])]
    if not hidden:
        return []
    for layer in hidden:
        layer.visible = False
    from napari.layers import Labels

    lesion = next((layer for layer in layers if isinstance(layer, Labels) and np.any(layer.data)), None)
    if lesion is not None:
        go_to_lesion(viewer, lesion)
    guard.fit_to(layers)
    guard.refresh()
    names = [layer.name for layer in hidden]
    guard.alone_note = (f"Shown alone: {layers[0].name.split()[0]} is another brain on the model's grid; hidden, not "
                        f"removed: {', '.join(names)}. Click their eye in the layer list to show them again, or "
                        "compare with the Generate dock's 'Side by side'.")
    return names


_guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def view_guard(viewer: napari.Viewer) -> ViewGuard:
    """The viewer's ViewGuard, installed on first use. A dock gets napari's public-only proxy of the viewer; the
    guard holds the viewer itself (through the proxy, every object reached anew is a new proxy: the canvas font
    never was the same object twice, and its glyph warm-up restarted for ever)."""
    viewer = unproxied(viewer)
    guard = _guards.get(viewer)
    if guard is None:
        guard = _guards[viewer] = ViewGuard(viewer)
        prefer_this_reader()
        guard.warm_glyphs()  # a dock opened, or a first opening: the caption's glyphs before its first showing
    return guard


NIFTI_PATTERNS = ("*.nii", "*.nii.gz")
PLUGIN_NAME = "napari-neuromf"


def prefer_this_reader() -> None:
    """Make this plugin napari's reader for NIfTI files, unless the user already chose one.

    napari's built-in reader also claims ``*.nii.gz``: without a preference File > Open and drag and drop ask
    which reader to use, and the built-in one shows the raw array (no affine: a sagittal slice on its side). A
    preference the user set is never replaced.
    """
    from napari.settings import get_settings

    plugins = get_settings().plugins
    chosen = dict(plugins.extension2reader)
    missing = [pattern for pattern in NIFTI_PATTERNS if pattern not in chosen]
    if missing:
        plugins.extension2reader = {**chosen, **dict.fromkeys(missing, PLUGIN_NAME)}


def guard_current_viewer() -> napari.Viewer | None:
    """Install the ViewGuard on the viewer napari is opening into (the reader and the samples call this before
    napari adds their layers) and return that viewer; None when there is none (a script calling the reader).
    napari's viewer module is only looked up, never imported: importing it loads Qt (seconds) in a process
    without a viewer."""
    import sys

    viewer_module = sys.modules.get("napari.viewer")
    viewer = None if viewer_module is None else viewer_module.current_viewer()
    if viewer is not None:
        view_guard(viewer)
    return viewer
