"""Serving (``skillhub serve``): every skill of a registry behind one OpenAI-compatible endpoint.

- :mod:`~skillhub.serving.protocol`: OpenAI's request and response shapes, and skillhub's extras;
- :mod:`~skillhub.serving.engine`: the thread that owns the model, batching by pack set;
- :mod:`~skillhub.serving.decoding`: one batch's rows while they generate (streams, stops);
- :mod:`~skillhub.serving.catalog`: the model ids of the live lineage;
- :mod:`~skillhub.serving.metrics`: Prometheus metrics;
- :mod:`~skillhub.serving.app`: the FastAPI app, :func:`create_app`;
- :mod:`~skillhub.serving.server`: uvicorn, and the exposure check.

Layer 7: imports routing, the registry and everything below. FastAPI, starlette, uvicorn and
prometheus-client are imported here only (the ``serve`` extra).
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {
    "create_app": "skillhub.serving.app",
    "Limits": "skillhub.serving.app",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
