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
        """Process Qt events for `seconds`."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.app.processEvents()
            time.sleep(0.01)

    def until(self, done: Callable[[], bool], what: str) -> float:
        """Process Qt events until `done()`; the seconds it took."""
        begin = time.perf_counter()
        while not done():
            if time.perf_counter() - begin > self.timeout:
                raise TimeoutError(f"{self.script}: {what} did not finish in {self.timeout} s")
            self.pump(0.05)
        return time.perf_counter() - begin
