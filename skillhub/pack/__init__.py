"""The SkillPack on disk: manifest (``manifest``: schema validation, totals, identity),
format (``format``: read, verify, write, decode), model card (``card``), the JSON Schemas
(``schemas``) and the one naming rule (``names``).

Layer 3: imports layers 0-2. Public names load lazily (``skillhub list`` needs no torch).
"""

from skillhub._lazy import lazy_exports

_EXPORTS = {
    "SkillPack": "skillhub.pack.format", "PackWriter": "skillhub.pack.format", "load_pack": "skillhub.pack.format",
    "sha256_file": "skillhub.pack.format", "write_manifest": "skillhub.pack.format",
    "MANIFEST_FILE": "skillhub.pack.manifest", "TENSORS_FILE": "skillhub.pack.manifest",
    "CARD_FILE": "skillhub.pack.manifest", "validate_manifest": "skillhub.pack.manifest",
    "check_name": "skillhub.pack.names",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
