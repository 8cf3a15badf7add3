"""Driving a real napari window from a script (scripts/screenshot.py, scripts/first_walk.py): Qt events are
processed for a while, or until a condition holds, so the docks' jobs and the canvas run as they do for a user."""

from __future__ import annotations

import time
from collections.abc import Callable


def hide_qt_binding_toast() -> None:
    """Keep napari's one-off Qt-binding ("PyQt5 is deprecated") toast out of the pictures."""
    try:
        import napari._qt.qt_main_window as qt_main_window

        qt_main_window.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass


class QtDriver:
    """Runs the Qt event loop of `app` for a script: `pump` for a while, `until` a condition (at most `timeout`
    seconds, then a TimeoutError naming `script` and what it waited for)."""

    def __init__(self, app, timeout: float, script: str) -> None:
        self.app, self.timeout, self.script = app, timeout, script

    def pump(self, seconds: float = 0.2) -> None:
        """Run a Qt event loop for `seconds`, as the app's own loop runs (not `processEvents` in a poll: that never
        deletes what `deleteLater` left from outside a loop, e.g. napari's progress bar of a `viewer.open`, and
        napari's activity indicator then animates for the rest of the session: ~25 window repaints a second, which
        on a software-OpenGL display took a quarter of a 2-core CPU and made a generation 1.2-1.6x slower)."""
        from qtpy.QtCore import QEventLoop, QTimer

        loop = QEventLoop()
        QTimer.singleShot(max(0, int(seconds * 1000)), loop.quit)
        loop.exec()

    def until(self, done: Callable[[], bool], what: str) -> float:
        """Process Qt events until `done()`; the seconds it took."""
        begin = time.perf_counter()
        while not done():
            if time.perf_counter() - begin > self.timeout:
                raise TimeoutError(f"{self.script}: {what} did not finish in {self.timeout} s")
            self.pump(0.05)
        return time.perf_counter() - begin
