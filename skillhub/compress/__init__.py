"""From a fine-tune to a pack: module roles (``roles``), recipes (``recipe``), the streamed
delta (``delta``), calibration statistics (``calibrate``), budget mode (``budget``) and
``create_pack`` as named stages (``pipeline``).

Layer 4: imports layers 0-3.
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {"create_pack": "skillhub.compress.pipeline"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
