"""skillhub: a continual-learning registry and plugin hub for SkillPacks (GraftLLM, arXiv 2505.18502).

Python API::

    from skillhub import create_pack, load_pack, apply_packs
    pack = create_pack("base-model/", "tuned-model/", "packs/math", task="math")
    apply_packs("base-model/", ["packs/math"], "math-model/")

    from skillhub import Registry
    registry = Registry()                      # $SKILLHUB_HOME, or a directory, or a SQLAlchemy URL
    registry.add("packs/math", task="math")
    with registry.activated(model, task="math"):   # patched in place, exact bits restored after
        ...

    from skillhub import push_pack, pull_pack     # the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT)
    push_pack("3f2a9c1b07de", "me/math-pack", registry=registry)
    pull_pack("me/math-pack@v1.0.0", registry=Registry("other-registry/"))

Exports are imported on first use, so ``import skillhub`` (and ``skillhub --help``) do not
pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_packs": "skillhub.activate",
    "create_pack": "skillhub.compress",
    "load_pack": "skillhub.pack",
    "pull_pack": "skillhub.sharing",
    "push_lineage": "skillhub.sharing",
    "push_pack": "skillhub.sharing",
    "Registry": "skillhub.registry",
    "SkillPack": "skillhub.pack",
    "SkillhubError": "skillhub.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'skillhub' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
