"""The model ids a server offers (``/v1/models``), read from the live lineage.

One id per task whose activation set has packs, ``auto`` when the router can route the lineage
as it is now (trained, not stale), and ``base``. The list is read again only when the lineage
changed (:meth:`Registry.last_event`), so listing is one query on a busy server.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from skillhub.errors import SkillhubError
from skillhub.registry.front import Registry
from skillhub.routing.training import load_router
from skillhub.serving.engine import AUTO, BASE


class Catalog:
    """The served model ids of one base, as OpenAI ``model`` objects (with skillhub's details)."""

    def __init__(self, registry: Registry, *, base: str | None = None, allow_stale: bool = False) -> None:
        self.registry, self.base, self.allow_stale = registry, base, allow_stale
        self._lock = threading.Lock()
        self._version, self._models = -1, []
        self.created = int(time.time())

    def models(self) -> list[dict[str, Any]]:
        with self._lock:
            version = self.registry.last_event(base=self.base)
            if version != self._version:
                self._models, self._version = self._read(), version
            return list(self._models)

    def _read(self) -> list[dict[str, Any]]:
        active = [p.id for p in self.registry.list_packs(base=self.base)]
        sets = {t.name: list(t.packs) for t in self.registry.tasks(base=self.base)}
        models = [self._model(name, packs=ids) for name, ids in sets.items() if ids and name not in (AUTO, BASE)]
        try:
            router = load_router(self.registry, base=self.base)
            router.check_usable(active, sets, allow_stale=self.allow_stale)
        except SkillhubError:
            pass  # no usable router: auto is not offered (a request for it says why)
        else:
            models.append(self._model(AUTO, classes=[c.name for c in router.classes]))
        models.append(self._model(BASE, packs=[]))
        return models

    def _model(self, name: str, **details: Any) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "skillhub", "skillhub": details}
