"""Reading scans (NIfTI, BIDS discovery) and mapping them onto the model grid."""

from neuromf.io.nifti import (
           Preprocessing,
           Volume,
           VolumeError,
           preprocess_image,
           preprocess_pair,
           read_nifti,
           save_nifti,
)

__all__ = ["Preprocessing", "Volume", "VolumeError", "preprocess_image", "preprocess_pair", "read_nifti",
           "save_nifti"]
