"""The Qt binding: the plugin's `qt` extra installs the one napari recommends (PyQt6), and napari starts on it
without the PyQt5 deprecation notice it shows in every PyQt5 session."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START = """
import json, qtpy
import napari
from napari.utils.notifications import notification_manager
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
QApplication.processEvents()
print(json.dumps([qtpy.API_NAME, [str(n.message) for n in notification_manager.records]]))
viewer.close()
"""


def _start_napari(api: str) -> tuple[str, list[str]]:
    """(binding qtpy chose, notification texts) of a fresh napari process started on ``api``."""
    env = {**os.environ, "QT_API": api}
    done = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    binding, messages = json.loads(done.stdout.strip().splitlines()[-1])
    return binding, messages


def test_the_qt_extra_is_pyqt6():
    line = re.search(r"^qt = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)  # tomllib: 3.11+
    assert line is not None and re.findall(r'"([A-Za-z0-9_]+)', line.group(1)) == ["pyqt6"]


@pytest.mark.skipif(importlib.util.find_spec("PyQt6") is None, reason="PyQt6 (the qt extra) is not installed")
def test_napari_starts_on_pyqt6_without_a_deprecation_notice():
    binding, messages = _start_napari("pyqt6")
    assert binding == "PyQt6"
    assert not [m for m in messages if "deprecated" in m.lower()], messages
    if importlib.util.find_spec("PyQt5") is not None:  # the check sees the notice where it is shown
        binding, messages = _start_napari("pyqt5")
        assert binding == "PyQt5" and any("PyQt5 backend is deprecated" in m for m in messages), messages
