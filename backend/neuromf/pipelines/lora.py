"""Deprecated module name (kept for one release): the joint mode's pipeline is `neuromf.pipelines.joint`.

This name is the same module object as `neuromf.pipelines.joint`, so `from neuromf.pipelines.lora import X` and
monkeypatching either name keep working.
"""

from __future__ import annotations

import sys
import warnings

from neuromf.pipelines import joint as _joint

warnings.warn("neuromf.pipelines.lora is deprecated: use neuromf.pipelines.joint", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _joint
