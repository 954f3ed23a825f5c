"""Publishing SkillPacks on the Hugging Face Hub and pulling them into a registry.

A pushed pack is a model repo (or a folder of one) holding its ``skillpack.json``,
``skillpack.safetensors`` and model card, with the commit tagged ``v<pack version>``. A
pushed lineage puts every active pack of a base model in its own folder, plus
``lineage.json`` (schemas/lineage.schema.json) giving their order and explicit activation
sets, and a card for the whole repo.

A pull resolves the revision to one commit, reads the manifest, checks it against its
schema and the registered base model, and only then downloads the files the manifest
names, each hashed as it arrives and compared with the manifest. Everything lands in a
private directory under the store and is registered in one transaction at the end, so a
failed or interrupted pull registers nothing and leaves no pack in the store. The
manifest then records where the pack came from (``source``: repo, revision, commit, path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from skillhub import __version__
from skillhub import config
from skillhub.errors import HubError, PackError, SkillhubError
from skillhub.jsonio import MAX_DOCUMENT_BYTES, parse_json
from skillhub.manifest import CARD_FILE, MANIFEST_FILE, TENSORS_FILE, validate_manifest
from skillhub.progress import ProgressCallback, no_progress

if TYPE_CHECKING:
    from skillhub.hub import Snapshot
    from skillhub.pack import SkillPack
    from skillhub.registry import Registry

LINEAGE_FILE = "lineage.json"
TAG_PREFIX = "v"
MAX_MANIFEST_BYTES = MAX_DOCUMENT_BYTES  # skillpack.json as served by a repo
MAX_LINEAGE_BYTES = 4 * 1024 * 1024  # lineage.json: about 300 bytes a pack
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``OWNER/NAME[@REV]`` -> (repo id, revision or None).

    Raises:
        SkillhubError: It is not of that form.
    """
    repo_id, at, revision = reference.partition("@")
    check_repo_id(repo_id)
    if at and not revision:
        raise SkillhubError(f"{reference!r} names no revision after '@': write OWNER/NAME@BRANCH, @TAG or @COMMIT")
    return repo_id, revision or None


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but ``OWNER/NAME``."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise SkillhubError(f"{repo_id!r} is not a Hub repo id: write OWNER/NAME (letters, digits, '.', '_', '-')")


def _folder(path: str | None) -> str:
    """A folder inside a repo given by the user, normalised; '' for the root."""
    if not path:
        return ""
    parts = PurePosixPath(path.strip("/")).parts
    if any(part in ("..", ".") for part in parts) or "\\" in path:
        raise SkillhubError(f"--path {path!r} must be a folder inside the repo, without '..'")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# --------------------------------------------------------------------------- push


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
    from skillhub import hub

    check_repo_id(repo_id)
    opened = _open_for_push(pack, registry)
    tag = TAG_PREFIX + opened.version
    sha256 = opened.manifest["files"][TENSORS_FILE]["sha256"]
    result = {"repo": repo_id, "revision": revision or "main", "tag": tag, "url": f"{hub.endpoint()}/{repo_id}",
              "name": opened.name, "version": opened.version, "sha256": sha256, "unchanged": False}
    tagged = hub.tags(repo_id).get(tag)
    if tagged is not None:
        remote = _remote_manifest(hub.snapshot(repo_id, tagged), MANIFEST_FILE)
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
    from skillhub import hub
    from skillhub.schemas import validate

    from skillhub.registry import NotFoundError

    check_repo_id(repo_id)
    entries = registry.list_packs(base=base)
    if not entries:
        raise NotFoundError("the registry has no active pack to publish for this base model")
    folders = _folder_names(entries)
    by_id = {e["id"]: e for e in entries}
    files: dict[str, Path] = {}
    expected: dict[str, str] = {}
    packs = []
    with tempfile.TemporaryDirectory(prefix="skillhub-push-") as scratch:
        for entry in entries:
            opened = registry.store.open(entry["sha256"], verify=False)  # the upload hashes every file
            pack_files, pack_expected = _pack_files(opened, folders[entry["id"]], Path(scratch))
            files.update(pack_files)
            expected.update(pack_expected)
            parent = by_id.get(entry["parent"]) if entry["parent"] else None
            packs.append({"path": folders[entry["id"]], "name": entry["name"], "version": entry["version"],
                          "task": entry["task"], "sha256": entry["sha256"],
                          "parent": parent["sha256"] if parent else None})
        recorded = opened.manifest["base"]
        lineage = {
            "format": "skillhub-lineage", "format_version": 1,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "skillhub_version": __version__,
            "base": {key: recorded.get(key) for key in ("id", "revision", "architecture", "model_type", "fingerprint")},
            "packs": packs,
            "tasks": {t["name"]: [folders[p] for p in t["packs"]]
                      for t in registry.tasks(base=entries[0]["base"]) if t["explicit"]},
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
    from skillhub.pack import SkillPack, load_pack

    if isinstance(pack, SkillPack):
        return pack
    if Path(pack).is_dir():
        return load_pack(pack, verify=False)  # the upload hashes every file against the manifest
    if registry is None:
        raise SkillhubError(f"{pack} is neither a pack directory nor a pack id (no registry given)")
    entry = registry.show(str(pack))
    return registry.store.open(entry["sha256"], verify=False)


def _pack_files(pack: SkillPack, folder: str, scratch: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The files to upload for ``pack`` under ``folder`` and their expected sha256.

    The published manifest leaves out ``source``: where a pack was pulled from is local
    knowledge, which a later pull records afresh.
    """
    manifest = {key: value for key, value in pack.manifest.items() if key != "source"}
    local_manifest = scratch / (folder or ".") / MANIFEST_FILE
    local_manifest.parent.mkdir(parents=True, exist_ok=True)
    local_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    files = {_join(folder, MANIFEST_FILE): local_manifest}
    expected = {}
    for name, recorded in pack.manifest["files"].items():
        files[_join(folder, name)] = pack.path / name
        expected[_join(folder, name)] = recorded["sha256"]
    return files, expected


def _folder_names(entries: list[dict[str, Any]]) -> dict[str, str]:
    """One folder per pack: ``<name>-<version>``, with the pack id added if that repeats."""
    names = [f"{e['name']}-{e['version']}" for e in entries]
    return {e["id"]: (n if names.count(n) == 1 else f"{n}-{e['id']}") for e, n in zip(entries, names)}


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


# --------------------------------------------------------------------------- pull


def pull_pack(reference: str, *, registry: Registry | None = None, path: str | None = None, register: bool = True,
              output: str | os.PathLike[str] | None = None, force: bool = False, base: str | None = None,
              new_base: bool = False, base_location: str | None = None,
              progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Pull a pack, or a whole lineage, from the Hub.

    Args:
        reference: ``OWNER/NAME`` or ``OWNER/NAME@REV`` (branch, tag or commit id).
        registry: The registry to add to (default: the default registry).
        path: Folder of the repo holding the pack or lineage (default: its root).
        register: Add the pulled packs to ``registry``; otherwise only write them to ``output``.
        output: Without ``register``: directory to create (default: ``./<pack name>``, or
            ``./<repo name>`` for a lineage, one folder per pack).
        force: Without ``register``: replace ``output`` if it exists.
        base, new_base, base_location: As :meth:`Registry.add`.
        progress: Called as ``progress(file name, bytes done, bytes total)``.

    Returns:
        ``repo``, ``revision``, ``commit`` and ``packs``: per pack its folder, name, version,
        ``status`` (``added``, ``present``: already registered, or ``downloaded``) and, when
        registered, its registry entry.

    Raises:
        HubError: The repo, revision or files cannot be fetched, or hold no pack.
        PackError: A manifest fails its schema, names a path outside its folder, or a file
            does not match its sha256 (nothing is registered).
        MismatchError: The packs were made for another base than the registered one.
    """
    from skillhub import hub

    repo_id, revision = parse_reference(reference)
    folder = _folder(path)
    at = hub.snapshot(repo_id, revision)
    with tempfile.TemporaryDirectory(prefix="skillhub-pull-") as scratch:
        plan = _plan(at, folder, Path(scratch))
    if not register:
        return _pull_to_directory(at, folder, plan, output, force=force, progress=progress)
    if registry is None:
        from skillhub.registry import Registry

        registry = Registry()
    for _, manifest in plan.packs:  # the base check needs only the manifests: before any big download
        registry.check_base(manifest["base"], base=base, new_base=new_base)
    staging = registry.store.incoming("pull")
    try:
        return _pull_into_registry(at, folder, plan, staging, registry, base=base, new_base=new_base,
                                   base_location=base_location, progress=progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class _Plan:
    """What a pull fetches: the packs in order, as (folder in the repo, manifest), and the
    lineage document when the repo holds a lineage."""

    packs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lineage: dict[str, Any] | None = None


def _plan(at: Snapshot, folder: str, scratch: Path) -> _Plan:
    plan = _Plan()
    where = f"{at.repo_id}@{at.revision}" + (f" folder {folder}" if folder else "")
    if _join(folder, LINEAGE_FILE) in at.files:
        from skillhub.schemas import validate

        lineage = _remote_json(at, _join(folder, LINEAGE_FILE), scratch, max_bytes=MAX_LINEAGE_BYTES)
        validate(lineage, "lineage", error=PackError, what=f"{LINEAGE_FILE} of {where}")
        _check_lineage(lineage, f"{LINEAGE_FILE} of {where}")
        plan.lineage = lineage
        for entry in lineage["packs"]:  # the schema keeps each path a plain top-level folder (no '/', '..')
            manifest = _read_manifest(at, _join(folder, entry["path"]), scratch)
            if manifest["base"]["fingerprint"] != lineage["base"]["fingerprint"]:
                raise PackError(f"{where}: pack {entry['path']} was made for another base than the lineage says")
            plan.packs.append((entry["path"], manifest))
    elif _join(folder, MANIFEST_FILE) in at.files:
        plan.packs.append(("", _read_manifest(at, folder, scratch)))
    else:
        raise HubError(
            f"{where} holds no {MANIFEST_FILE} or {LINEAGE_FILE}"
            + ("" if folder else ": pass --path FOLDER if the pack is in a folder of the repo")
        )
    return plan


def _read_manifest(at: Snapshot, pack_folder: str, scratch: Path) -> dict[str, Any]:
    where = f"{at.repo_id}@{at.revision}/{_join(pack_folder, MANIFEST_FILE)}"
    manifest = _remote_json(at, _join(pack_folder, MANIFEST_FILE), scratch, max_bytes=MAX_MANIFEST_BYTES)
    validate_manifest(manifest, what=where)
    names = set(manifest.get("files") or {})
    if TENSORS_FILE not in names:
        raise PackError(f"{where} lists no {TENSORS_FILE}")
    for name in sorted(names):
        _check_file_name(name, where)
    missing = sorted(_join(pack_folder, n) for n in names if _join(pack_folder, n) not in at.files)
    if missing:
        raise HubError(f"{where} names files the repo does not have at {at.commit[:12]}: {', '.join(missing)}")
    return manifest


def _check_file_name(name: str, where: str) -> None:
    # A pulled manifest decides which files are written where: anything but a plain file name
    # could climb out of the pack directory (and out of the store).
    if name in ("", ".", "..") or "/" in name or "\\" in name or name == MANIFEST_FILE or name.startswith("."):
        raise PackError(f"{where} names the file {name!r}, which is not a plain file name inside the pack: refused")


def _check_lineage(lineage: dict[str, Any], where: str) -> None:
    """What the schema cannot say: a bounded number of distinct packs, and tasks that name them."""
    packs = lineage["packs"]
    limit = config.max_lineage_packs()
    if len(packs) > limit:
        raise PackError(f"{where} lists {len(packs)} packs, more than the limit of {limit} "
                        "(raise it with SKILLHUB_MAX_LINEAGE_PACKS if you trust this repo)")
    for key in ("path", "sha256"):
        seen: set[str] = set()
        for entry in packs:
            if entry[key] in seen:
                raise PackError(f"{where} lists the pack {key} {entry[key]} twice: refused")
            seen.add(entry[key])
    folders = {entry["path"] for entry in packs}
    for task, members in lineage["tasks"].items():
        unknown = sorted(set(members) - folders)
        if unknown:
            raise PackError(f"{where}: task {task} names folder {unknown[0]!r}, which is not one of its packs")


def _remote_json(at: Snapshot, filename: str, scratch: Path, *, max_bytes: int) -> dict[str, Any]:
    from skillhub import hub

    local = scratch / f"document-{len(list(scratch.iterdir()))}.json"
    what = f"{at.repo_id}@{at.revision}/{filename}"
    document = parse_json(hub.read_bytes(at, filename, local, max_bytes=max_bytes), what=what, error=PackError)
    if not isinstance(document, dict):
        raise PackError(f"{at.repo_id}@{at.revision}/{filename} is not a JSON object")
    return document


def _remote_manifest(at: Snapshot, filename: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="skillhub-") as scratch:
        return _remote_json(at, filename, Path(scratch), max_bytes=MAX_MANIFEST_BYTES)


def _download_pack(at: Snapshot, pack_folder: str, manifest: dict[str, Any], target: Path,
                   progress: ProgressCallback) -> SkillPack:
    """Download the files a manifest names into ``target``, each checked against its sha256."""
    from skillhub import hub
    from skillhub.pack import load_pack, write_manifest

    target.mkdir(parents=True, exist_ok=True)
    for name, expected in sorted(manifest["files"].items()):
        sha256, size = hub.download(at, _join(pack_folder, name), target / name, durable=True,
                                    max_bytes=expected["bytes"], progress=progress)
        if sha256 != expected["sha256"] or size != expected["bytes"]:
            raise PackError(
                f"{at.repo_id}@{at.revision}/{_join(pack_folder, name)} does not match the sha256 and size in its "
                "manifest: the file was damaged or tampered with; nothing was registered"
            )
    manifest = {**manifest, "source": {"repo": at.repo_id, "revision": at.revision, "commit": at.commit,
                                       "path": pack_folder}}
    write_manifest(target, manifest)
    # Hashes were checked while downloading and the manifest against its schema before.
    return load_pack(target, verify=False, checked_manifest=manifest)


def _pull_to_directory(at: Snapshot, folder: str, plan: _Plan, output: str | os.PathLike[str] | None, *,
                       force: bool, progress: ProgressCallback) -> dict[str, Any]:
    from skillhub.outputs import staged_directory

    default = at.repo_id.split("/")[1] if plan.lineage is not None else plan.packs[0][1]["name"]
    output = Path(output) if output else Path.cwd() / default
    packs = []
    with staged_directory(output, force=force, kind="pull") as staging:
        for pack_folder, manifest in plan.packs:
            target = staging / pack_folder if plan.lineage is not None else staging
            _download_pack(at, _join(folder, pack_folder), manifest, target, progress)
            packs.append({"path": pack_folder, "name": manifest["name"], "version": manifest["version"],
                          "status": "downloaded"})
    return {"repo": at.repo_id, "revision": at.revision, "commit": at.commit, "packs": packs, "output": str(output)}


def _pull_into_registry(at: Snapshot, folder: str, plan: _Plan, staging: Path, registry: Registry, *,
                        base: str | None, new_base: bool, base_location: str | None,
                        progress: ProgressCallback) -> dict[str, Any]:
    packs, opened, tasks = [], [], []
    for index, (pack_folder, manifest) in enumerate(plan.packs):
        summary = {"path": pack_folder, "name": manifest["name"], "version": manifest["version"]}
        sha256 = manifest["files"][TENSORS_FILE]["sha256"]
        present = _registered(registry, sha256)
        if present is not None:
            packs.append({**summary, "status": "present", "entry": present})
            continue
        opened.append(_download_pack(at, _join(folder, pack_folder), manifest, staging / f"{index:04d}", progress))
        tasks.append(plan.lineage["packs"][index]["task"] if plan.lineage is not None else None)
        packs.append({**summary, "status": "added"})
    task_sets = {}
    if plan.lineage is not None:
        sha_of = {p["path"]: p["sha256"] for p in plan.lineage["packs"]}
        task_sets = {task: [sha_of[f] for f in members] for task, members in plan.lineage["tasks"].items()}
    entries = iter(registry.add_lineage(opened, tasks=tasks, task_sets=task_sets, base=base, new_base=new_base,
                                        base_location=base_location, adopt=True) if opened else [])
    for pack in packs:
        if pack["status"] == "added":
            pack["entry"] = next(entries)
    return {"repo": at.repo_id, "revision": at.revision, "commit": at.commit, "packs": packs}


def _registered(registry: Registry, sha256: str) -> dict[str, Any] | None:
    from skillhub.registry import NotFoundError

    try:
        entry = registry.show(sha256[:12])
    except NotFoundError:
        return None
    return entry if entry.get("state") == "active" and entry.get("sha256") == sha256 else None
