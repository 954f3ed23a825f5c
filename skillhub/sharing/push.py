"""Publishing SkillPacks on the Hugging Face Hub.

A pushed pack is a model repo (or a folder of one) holding its ``skillpack.json``,
``skillpack.safetensors`` and model card, with the commit tagged ``v<pack version>``. A
pushed lineage puts every active pack of a base model in its own folder, plus
``lineage.json`` (schemas/lineage.schema.json) giving their order and explicit activation
sets, and a card for the whole repo.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub import __version__
from skillhub.errors import HubError, PackError, SkillhubError
from skillhub.pack.manifest import CARD_FILE, MANIFEST_FILE, TENSORS_FILE
from skillhub.sharing.common import LINEAGE_FILE, TAG_PREFIX, check_repo_id, join, remote_manifest

if TYPE_CHECKING:
    from skillhub.pack.format import SkillPack
    from skillhub.registry.front import Registry
    from skillhub.registry.results import PackEntry


def push_pack(pack: str | os.PathLike[str] | SkillPack, repo_id: str, *, registry: Registry | None = None,
              revision: str | None = None, private: bool = False, message: str | None = None) -> dict[str, Any]:
    """Publish one pack as a Hub model repo and tag the commit ``v<pack version>``.

    Args:
        pack: A registry pack id (with ``registry``), a pack directory or an opened pack.
        repo_id: ``OWNER/NAME``; created (``private`` if asked) when it does not exist.
        registry: Where to look up a pack id.
        revision: Branch to commit to (created from the default branch if missing).
        private: Create the repo private.
        message: Commit message.

    Returns:
        ``repo``, ``revision``, ``commit``, ``tag``, ``url``, the pack's name, version and
        sha256, and ``unchanged`` (true when the tag already held this very pack).

    Raises:
        HubError: The Hub refuses, or the tag already holds a different pack.
        PackError: The pack is corrupt (nothing is sent).
    """
    from skillhub.io import hub

    check_repo_id(repo_id)
    opened = _open_for_push(pack, registry)
    tag = TAG_PREFIX + opened.version
    sha256 = opened.manifest.tensors_sha256
    result = {"repo": repo_id, "revision": revision or "main", "tag": tag, "url": f"{hub.endpoint()}/{repo_id}",
              "name": opened.name, "version": opened.version, "sha256": sha256, "unchanged": False}
    tagged = hub.tags(repo_id).get(tag)
    if tagged is not None:
        remote = remote_manifest(hub.snapshot(repo_id, tagged), MANIFEST_FILE)
        if remote.get("files", {}).get(TENSORS_FILE, {}).get("sha256") != sha256:
            raise HubError(
                f"{repo_id} already has tag {tag} for another pack ({remote.get('name')} {remote.get('version')}): "
                "publish this one under a new version (`skillhub create --pack-version`)"
            )
        return {**result, "commit": tagged, "unchanged": True}
    with tempfile.TemporaryDirectory(prefix="skillhub-push-") as scratch:
        files, expected = _pack_files(opened, "", Path(scratch))
        commit = hub.upload(repo_id, files, expected_sha256=expected, revision=revision, private=private,
                            message=message or f"Add SkillPack {opened.name} {opened.version} (task {opened.task})")
    hub.tag(repo_id, tag, commit, f"SkillPack {opened.name} {opened.version}")
    return {**result, "commit": commit}


def push_lineage(repo_id: str, *, registry: Registry, base: str | None = None, revision: str | None = None,
                 private: bool = False, message: str | None = None) -> dict[str, Any]:
    """Publish every active pack of a base model, each in its own folder, with ``lineage.json``.

    Returns:
        ``repo``, ``revision``, ``commit``, ``url`` and the ``lineage`` document.

    Raises:
        NotFoundError: The base has no active pack.
        HubError: The Hub refuses.
    """
    from skillhub.io import hub
    from skillhub.pack.schemas import validate

    from skillhub.errors import NotFoundError

    check_repo_id(repo_id)
    entries = registry.list_packs(base=base)
    if not entries:
        raise NotFoundError("active pack to publish", None)
    folders = _folder_names(entries)
    by_id = {e.id: e for e in entries}
    files: dict[str, Path] = {}
    expected: dict[str, str] = {}
    packs = []
    with tempfile.TemporaryDirectory(prefix="skillhub-push-") as scratch:
        for entry in entries:
            opened = registry.store.open(entry.sha256, verify=False)  # the upload hashes every file
            pack_files, pack_expected = _pack_files(opened, folders[entry.id], Path(scratch))
            files.update(pack_files)
            expected.update(pack_expected)
            parent = by_id.get(entry.parent) if entry.parent else None
            packs.append({"path": folders[entry.id], "name": entry.name, "version": entry.version,
                          "task": entry.task, "sha256": entry.sha256, "parent": parent.sha256 if parent else None})
        recorded = opened.manifest["base"]  # the lineage document repeats it as JSON
        lineage = {
            "format": "skillhub-lineage", "format_version": 1,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "skillhub_version": __version__,
            "base": {key: recorded.get(key) for key in ("id", "revision", "architecture", "model_type", "fingerprint")},
            "packs": packs,
            "tasks": {t.name: [folders[p] for p in t.packs] for t in registry.tasks(base=entries[0].base) if t.explicit},
        }
        validate(lineage, "lineage", error=PackError, what="the lineage export")
        files[LINEAGE_FILE] = Path(scratch) / LINEAGE_FILE
        files[LINEAGE_FILE].write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
        files[CARD_FILE] = Path(scratch) / CARD_FILE
        files[CARD_FILE].write_text(_lineage_card(lineage, repo_id), encoding="utf-8")
        commit = hub.upload(repo_id, files, expected_sha256=expected, revision=revision, private=private,
                            message=message or f"Publish the lineage of {recorded['id']} ({len(packs)} packs)")
    return {"repo": repo_id, "revision": revision or "main", "commit": commit, "url": f"{hub.endpoint()}/{repo_id}",
            "lineage": lineage}


def _open_for_push(pack: str | os.PathLike[str] | SkillPack, registry: Registry | None) -> SkillPack:
    from skillhub.pack.format import SkillPack, load_pack

    if isinstance(pack, SkillPack):
        return pack
    if Path(pack).is_dir():
        return load_pack(pack, verify=False)  # the upload hashes every file against the manifest
    if registry is None:
        raise SkillhubError(f"{pack} is neither a pack directory nor a pack id (no registry given)")
    entry = registry.show(str(pack))
    return registry.store.open(entry.sha256, verify=False)


def _pack_files(pack: SkillPack, folder: str, scratch: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The files to upload for ``pack`` under ``folder`` and their expected sha256.

    The published manifest leaves out ``source``: where a pack was pulled from is local
    knowledge, which a later pull records afresh.
    """
    manifest = {key: value for key, value in pack.manifest.items() if key != "source"}
    local_manifest = scratch / (folder or ".") / MANIFEST_FILE
    local_manifest.parent.mkdir(parents=True, exist_ok=True)
    local_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    files = {join(folder, MANIFEST_FILE): local_manifest}
    expected = {}
    for name, recorded in pack.manifest.files.items():
        files[join(folder, name)] = pack.path / name
        expected[join(folder, name)] = recorded["sha256"]
    return files, expected


def _folder_names(entries: list[PackEntry]) -> dict[str, str]:
    """One folder per pack: ``<name>-<version>``, with the pack id added if that repeats."""
    names = [f"{e.name}-{e.version}" for e in entries]
    return {e.id: (n if names.count(n) == 1 else f"{n}-{e.id}") for e, n in zip(entries, names)}


def _lineage_card(lineage: dict[str, Any], repo_id: str) -> str:
    base = lineage["base"]
    tasks = sorted({p["task"] for p in lineage["packs"]})
    front = ["---", "library_name: skillhub", f"base_model: {json.dumps(base['id'])}", "base_model_relation: adapter",
             "tags:", *(f"- {json.dumps(t)}" for t in ["skillhub", "skillpack-lineage", *(f"task:{t}" for t in tasks)]),
             "---"]
    rows = [f"| {i} | `{p['path']}` | {p['task']} | {p['name']} | {p['version']} |"
            for i, p in enumerate(lineage["packs"], start=1)]
    body = f"""
# SkillPack lineage for `{base['id']}`

{len(lineage['packs'])} SkillPacks (compressed, removable fine-tune deltas made with
[skillhub](https://github.com/skillhub/skillhub), after GraftLLM, arXiv 2505.18502) in the
order they were added. Each folder is one pack with its own model card.

| # | folder | task | pack | version |
|---:|---|---|---|---|
{chr(10).join(rows)}

```bash
skillhub pull {repo_id}                       # adds every pack to your registry, in this order
skillhub activate --task {tasks[0]} -o ./model   # base + the packs of one task (paper Eq. 10)
```

Base fingerprint: `{base['fingerprint']}` (checked against your base model on pull).
"""
    return "\n".join(front) + "\n" + body


