"""The canvas font's glyphs for the caption and the orientation letters, rasterized a few per turn before they show.

napari draws text on its canvas (the text overlay that holds the caption, a points layer's text) with glyphs it
rasterizes on first use, per viewer: Qt paints the character at 256 pt, then a signed distance field is computed on
the CPU, ~5 ms a glyph on a 2-core CPU, all inside the draw that first shows them. The caption's ~40 glyphs held
the first opening of a session ~0.13 s in one draw (docs/user_guide_walk.md, "The first opening of a session").
`warm_glyphs` loads them a few per turn of the event loop; the ViewGuard shows the caption once they are in.

The font is napari's own (`VispyCanvas.font_info`, a Qt texture font shared by the canvas's text visuals); with a
napari that has none, nothing is warmed and the caption shows at once, its glyphs rasterized at its first draw.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

GLYPHS_PER_TURN = 4  # ~20-30 ms of GUI-thread work a turn on a 2-core CPU
# vispy measures every text's line height with these (and a space) before laying it out
VISPY_LAYOUT_GLYPHS = "ÅÉÑŐjgpqy "

_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # texture font -> characters loaded through here


def canvas_font(viewer: napari.Viewer) -> Any | None:
    """The texture font the canvas's text visuals draw with (normal weight, napari's overlay face); None when this
    napari has no such font or the viewer's window is gone."""
    from napari_neuromf._viewing import unproxied

    try:
        info = unproxied(viewer).window._qt_viewer.canvas.font_info()
        return info.font_manager.get_font(info.face, False, False)
    except (AttributeError, RuntimeError, TypeError):
        return None


def glyphs_missing(font: Any, text: str) -> str:
    """The characters of ``text`` (and vispy's layout glyphs) not yet loaded through this module, in order."""
    done = _loaded.get(font, set())
    return "".join(sorted({char for char in text + VISPY_LAYOUT_GLYPHS if char != "\n"} - done))


def load_glyphs(font: Any, chars: str) -> None:
    """Rasterize ``chars`` into ``font`` now (a glyph napari already drew is a dictionary look-up)."""
    done = _loaded.setdefault(font, set())
    for char in chars:
        font[char]
        done.add(char)


def warm_glyphs(viewer: napari.Viewer, text: str, then: Callable[[], Any]) -> bool:
    """Rasterize the glyphs ``text`` needs on ``viewer``'s canvas, `GLYPHS_PER_TURN` per turn of the event loop,
    then call ``then()`` (also when the warm-up stops early: the font gone, the window closed). Returns False when
    there is nothing to wait for (all loaded, or no font to load them into): ``then`` is not called."""
    font = canvas_font(viewer)
    if font is None or not glyphs_missing(font, text):
        return False
    from qtpy.QtCore import QTimer

    font_ref = weakref.ref(font)

    def next_turn() -> None:
        live = font_ref()
        try:
            missing = "" if live is None else glyphs_missing(live, text)
            if missing:
                load_glyphs(live, missing[:GLYPHS_PER_TURN])
        except RuntimeError:  # the viewer's window closed meanwhile: stop, and let the caller go on
            missing = ""
        if len(missing) > GLYPHS_PER_TURN:
            QTimer.singleShot(0, next_turn)
        else:
            then()

    QTimer.singleShot(0, next_turn)
    return True


__all__ = ["GLYPHS_PER_TURN", "VISPY_LAYOUT_GLYPHS", "canvas_font", "glyphs_missing", "load_glyphs", "warm_glyphs"]
