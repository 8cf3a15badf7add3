"""Small helpers of the widget tests (imported by the test modules of this folder)."""

from __future__ import annotations

import numpy as np


def wait_idle(qtbot, widget, timeout_s: float = 120) -> None:
    """Until the widget's worker has finished and its handlers ran (``busy`` is cleared by the last one)."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout_s * 1000))


def ready(qtbot, widget):
    """The widget, once it has its defaults (the backend is imported in a worker the first time)."""
    qtbot.waitUntil(lambda: widget.ready, timeout=180_000)
    return widget


def tiny_lora_run(widget, base, data, out, max_steps: int, preview_every: int = 0) -> None:
    """Fill the LoRA dock for a tiny CPU run: the tiny base model, a phantom folder, rank 2, batch 2."""
    widget.base.setText(str(base))
    widget.data.setText(str(data))
    widget.strategy.setCurrentText("downsample")
    widget.rank.setValue(2)
    widget.batch_size.setValue(2)
    widget.max_steps.setValue(max_steps)
    widget.preview_every.setValue(preview_every)
    widget.device.setCurrentText("cpu")
    widget.output.setText(str(out))


def notes():
    """A callable returning the notification messages shown since this call."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: [str(n.message) for n in notification_manager.records[start:]]


def assert_overlay(image, labels) -> None:
    """An Image and an integer Labels layer on the same grid, in the same world coordinates."""
    from napari.layers import Image, Labels

    assert isinstance(image, Image) and isinstance(labels, Labels)
    assert image.data.shape == labels.data.shape
    assert np.allclose(image.scale, labels.scale) and np.allclose(image.translate, labels.translate)
    assert np.issubdtype(labels.data.dtype, np.integer)


def data_layers(viewer) -> list:
    """The viewer's layers without the orientation letters (a view aid, not data)."""
    from napari_neuromf._viewing import is_view_aid

    return [layer for layer in viewer.layers if not is_view_aid(layer)]


def case_files(root, subject: str = "sub-00001") -> tuple:
    """(FLAIR, lesion mask) files of one phantom subject."""
    anat = root / subject / "anat"
    return next(anat.glob("*_FLAIR.nii.gz")), next(anat.glob("*_FLAIR_roi.nii.gz"))


def in_running_gui(action, until, timeout_s: float = 30) -> list:
    """Call ``action()`` from inside a running Qt event loop, as napari's menus and drag and drop call a reader or
    a sample in the app (a test or a script calls them outside any loop), and run that loop until ``until()``;
    returns ``[action's result]``. Fails after ``timeout_s``."""
    import time

    from qtpy.QtCore import QEventLoop, QTimer

    loop, result = QEventLoop(), []
    QTimer.singleShot(0, lambda: result.append(action()))
    poll = QTimer()
    poll.setInterval(20)
    poll.timeout.connect(lambda: loop.quit() if result and until() else None)
    poll.start()
    deadline = QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    deadline.start(int(timeout_s * 1000))
    started = time.perf_counter()
    loop.exec()
    poll.stop()
    deadline.stop()
    assert result and until(), f"not done after {time.perf_counter() - started:.1f} s"
    return result
