"""The registry: per base model, the lineage of packs, task activation sets, evaluation
records, unlearning by removal. ``Registry`` (``front``) is the front; ``database``
(engines and sessions), ``tables`` and ``migrations`` (the schema), ``store`` (pack files),
``lineage``, ``tasks``, ``evals`` and ``doctor`` hold the work.

Layer 5: imports layers 0-4; the only package that imports sqlalchemy and sqlmodel.
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {"Registry": "skillhub.registry.front", "PackStore": "skillhub.registry.store"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
