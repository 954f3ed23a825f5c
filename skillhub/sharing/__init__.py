"""Packs leaving and entering skillhub: on the Hugging Face Hub, what is published (``push``) and
what a pull checks and registers (``pull``), with ``common`` holding repo ids and the lineage
document's names; as PEFT LoRA adapters, ``peft_export`` (``export --format peft``) and
``peft_import`` (``--from-peft``), with the adapter layout in ``peft_format``.

Layer 6: imports layers 0-5; reaches the Hub only through skillhub.io.hub.
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {"push_pack": "skillhub.sharing.push", "push_lineage": "skillhub.sharing.push",
            "pull_pack": "skillhub.sharing.pull", "parse_reference": "skillhub.sharing.common",
            "export_peft": "skillhub.sharing.peft_export", "import_peft": "skillhub.sharing.peft_import"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
