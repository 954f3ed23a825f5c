"""Routing (paper Eq. 9, App. B.3): a router over a base's SkillPacks, trained from routing
examples, stored in the registry as arrays + JSON, and routed generation.

- :mod:`~skillhub.routing.features`: the base model's mean-pooled hidden state of a prompt;
- :mod:`~skillhub.routing.router`: the router as arrays, its decisions, lifecycle and storage;
- :mod:`~skillhub.routing.training`: routing examples, task or loss labels, scikit-learn fit;
- :mod:`~skillhub.routing.spectral`: the training-free router (pack factors vs activations);
- :mod:`~skillhub.routing.evaluation`: ``route eval``;
- :mod:`~skillhub.routing.generate`: :class:`Generator`, answers with the right packs.

Layer 6: imports the registry and everything below it.
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {
    "Router": "skillhub.routing.router",
    "Decision": "skillhub.routing.router",
    "train_router": "skillhub.routing.training",
    "load_router": "skillhub.routing.training",
    "evaluate_router": "skillhub.routing.evaluation",
    "Generator": "skillhub.routing.generate",
    "Generation": "skillhub.routing.generate",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
