"""Deprecated module name (kept for one release): base-model volumes, `GeneratedPair` and `write_pairs` are
`neuromf.generation.images`.

This name is the same module object as `neuromf.generation.images`, so `from neuromf.generate import X` and
monkeypatching either name keep working.
"""

from __future__ import annotations

import sys
import warnings

from neuromf.generation import images as _images

warnings.warn("neuromf.generate is deprecated: use neuromf.generation.images", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _images
