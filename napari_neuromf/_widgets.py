"""Dock widgets. Thin: they call the `neuromf` backend and keep no training state of their own."""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class AboutWidget(QWidget):
    """Shows which backend, libraries and device NeuroMF will use."""

    def __init__(self, napari_viewer=None) -> None:
        super().__init__()
        import neuromf
        from neuromf.utils import library_versions, resolve_device

        versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
        text = f"NeuroMF {neuromf.__version__}\n{versions}\ndevice: {resolve_device('auto')}"
        layout = QVBoxLayout(self)
        self.label = QLabel(text)
        layout.addWidget(self.label)
