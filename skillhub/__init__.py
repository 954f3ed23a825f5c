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

    from skillhub import Generator, train_router   # one base, the right packs per prompt (Eq. 9, routed)
    train_router(registry)
    with Generator(registry) as generate:
        print(generate("What is 12 + 30?", route=True).output)

    from skillhub import push_pack, pull_pack     # the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT)
    push_pack("3f2a9c1b07de", "me/math-pack", registry=registry)
    pull_pack("me/math-pack@v1.0.0", registry=Registry("other-registry/"))

Exports are imported on first use, so ``import skillhub`` (and ``skillhub --help``) do not
pay for torch and transformers.
"""

from __future__ import annotations

from skillhub._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "apply_packs": "skillhub.activation",
    "create_pack": "skillhub.compress.pipeline",
    "Generator": "skillhub.routing.generate",
    "Merge": "skillhub.activation",
    "Router": "skillhub.routing.router",
    "train_router": "skillhub.routing.training",
    "load_pack": "skillhub.pack.format",
    "pull_pack": "skillhub.sharing.pull",
    "push_lineage": "skillhub.sharing.push",
    "push_pack": "skillhub.sharing.push",
    "Registry": "skillhub.registry.front",
    "SkillPack": "skillhub.pack.format",
    "SkillhubError": "skillhub.errors",
}
__all__ = ["__version__", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
