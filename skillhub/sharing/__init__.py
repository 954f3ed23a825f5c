"""Packs on the Hugging Face Hub: what is published (``push``) and what a pull checks
and registers (``pull``); ``common`` holds repo ids and the lineage document's names.

Layer 6: imports layers 0-5; reaches the Hub only through skillhub.io.hub.
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {"push_pack": "skillhub.sharing.push", "push_lineage": "skillhub.sharing.push",
            "pull_pack": "skillhub.sharing.pull", "parse_reference": "skillhub.sharing.common"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
