"""The four dock widgets, one module each; this module keeps the old import path working for scripts."""

from napari_neuromf._data_widget import FCDDataWidget, pair_mismatch
from napari_neuromf._generate_widget import GenerateWidget
from napari_neuromf._helpers import add_layer
from napari_neuromf._lora_widget import LoRAWidget
from napari_neuromf._mask_test_widget import MaskTestWidget

__all__ = ["FCDDataWidget", "GenerateWidget", "LoRAWidget", "MaskTestWidget", "add_layer", "pair_mismatch"]
