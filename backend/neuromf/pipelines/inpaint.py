"""Deprecated module name (kept for one release): inpainting is `neuromf.generation.inpaint`.

This name is the same module object as `neuromf.generation.inpaint`, so `from neuromf.pipelines.inpaint import X`
and monkeypatching either name keep working.
"""

from __future__ import annotations

import sys
import warnings

from neuromf.generation import inpaint as _inpaint

warnings.warn("neuromf.pipelines.inpaint is deprecated: use neuromf.generation.inpaint", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _inpaint
