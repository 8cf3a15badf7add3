"""napari plugin for NeuroMF: widgets, NIfTI reader/writer and sample data around the `neuromf` backend."""

__version__ = "0.1.0"
