"""Lazy public names for package ``__init__`` modules (PEP 562).

A package's public surface is listed in its ``__init__``, but importing the package must
not import its heavy modules (torch, transformers, sqlalchemy): ``skillhub list`` and
``skillhub --help`` stay fast because names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
