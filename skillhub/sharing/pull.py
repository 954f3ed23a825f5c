"""Pulling SkillPacks (or a lineage) from the Hugging Face Hub into a registry or a directory.

A pull resolves the revision to one commit, reads the manifest, checks it against its
schema and the registered base model, and only then downloads the files the manifest
names, each hashed as it arrives and compared with the manifest. Everything lands in a
private directory under the store and is registered in one transaction at the end, so a
failed or interrupted pull registers nothing and leaves no pack in the store. The
manifest then records where the pack came from (``source``: repo, revision, commit, path).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub import config
from skillhub.errors import HubError, PackError
from skillhub.pack.manifest import MANIFEST_FILE, Manifest, validate_manifest
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.results import PackEntry, Result
from skillhub.sharing.common import (
    LINEAGE_FILE,
    MAX_LINEAGE_BYTES,
    MAX_MANIFEST_BYTES,
    folder_in_repo,
    join,
    parse_reference,
    remote_json,
)

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from skillhub.io.hub import Snapshot
    from skillhub.pack.format import SkillPack
    from skillhub.registry.front import Registry


def pull_pack(reference: str, *, registry: Registry | None = None, path: str | None = None, register: bool = True,
              output: str | os.PathLike[str] | None = None, force: bool = False, base: str | None = None,
              new_base: bool = False, base_location: str | None = None, evaluate: bool = False,
              progress: ProgressCallback = no_progress) -> PullResult:
    """Pull a pack, or a whole lineage, from the Hub.

    Args:
        reference: ``OWNER/NAME`` or ``OWNER/NAME@REV`` (branch, tag or commit id).
        registry: The registry to add to (default: the default registry).
        path: Folder of the repo holding the pack or lineage (default: its root).
        register: Add the pulled packs to ``registry``; otherwise only write them to ``output``.
        output: Without ``register``: directory to create (default: ``./<pack name>``, or
            ``./<repo name>`` for a lineage, one folder per pack).
        force: Without ``register``: replace ``output`` if it exists.
        base: As :meth:`Registry.add`.
        new_base: As :meth:`Registry.add`.
        base_location: As :meth:`Registry.add`.
        evaluate: With ``register``, score every task with an eval set once the packs are in,
            recorded at the step of the last pack added (as ``skillhub add`` does).
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
    from skillhub.io import hub

    repo_id, revision = parse_reference(reference)
    folder = folder_in_repo(path)
    at = hub.snapshot(repo_id, revision)
    _log.info("%s@%s is commit %s", repo_id, at.revision, at.commit)
    with tempfile.TemporaryDirectory(prefix="skillhub-pull-") as scratch:
        plan = _plan(at, folder, Path(scratch))
    if not register:
        return _pull_to_directory(at, folder, plan, output, force=force, progress=progress)
    if registry is None:
        from skillhub.registry.front import Registry

        registry = Registry()
    for _, manifest in plan.packs:  # the base check needs only the manifests: before any big download
        registry.check_base(manifest.base, base=base, new_base=new_base)
    staging = registry.store.incoming("pull")
    try:
        result = _pull_into_registry(at, folder, plan, staging, registry, base=base, new_base=new_base,
                                     base_location=base_location, progress=progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    added = result.added
    if added and evaluate:
        from skillhub.evaluation.forgetting import evaluate_tasks

        scores = evaluate_tasks(registry, base=added[-1].base, step=added[-1].event, progress=progress)
        result = replace(result, scores=tuple(scores))
    return result


@dataclass
class _Plan:
    """What a pull fetches: the packs in order, as (folder in the repo, manifest), and the
    lineage document when the repo holds a lineage."""

    packs: list[tuple[str, Manifest]] = field(default_factory=list)
    lineage: dict[str, Any] | None = None


def _plan(at: Snapshot, folder: str, scratch: Path) -> _Plan:
    plan = _Plan()
    where = f"{at.repo_id}@{at.revision}" + (f" folder {folder}" if folder else "")
    if join(folder, LINEAGE_FILE) in at.files:
        from skillhub.pack.schemas import validate

        lineage = remote_json(at, join(folder, LINEAGE_FILE), scratch, max_bytes=MAX_LINEAGE_BYTES)
        validate(lineage, "lineage", error=PackError, what=f"{LINEAGE_FILE} of {where}")
        _check_lineage(lineage, f"{LINEAGE_FILE} of {where}")
        plan.lineage = lineage
        for entry in lineage["packs"]:  # the schema keeps each path a plain top-level folder (no '/', '..')
            manifest = _read_manifest(at, join(folder, entry["path"]), scratch)
            if manifest.base.fingerprint != lineage["base"]["fingerprint"]:
                raise PackError(f"{where}: pack {entry['path']} was made for another base than the lineage says")
            plan.packs.append((entry["path"], manifest))
    elif join(folder, MANIFEST_FILE) in at.files:
        plan.packs.append(("", _read_manifest(at, folder, scratch)))
    else:
        raise HubError(
            f"{where} holds no {MANIFEST_FILE} or {LINEAGE_FILE}"
            + ("" if folder else ": pass --path FOLDER if the pack is in a folder of the repo")
        )
    return plan


def _read_manifest(at: Snapshot, pack_folder: str, scratch: Path) -> Manifest:
    where = f"{at.repo_id}@{at.revision}/{join(pack_folder, MANIFEST_FILE)}"
    manifest = Manifest(remote_json(at, join(pack_folder, MANIFEST_FILE), scratch, max_bytes=MAX_MANIFEST_BYTES))
    validate_manifest(manifest, what=where)  # files required, skillpack.safetensors among them
    names = set(manifest.files)
    for name in sorted(names):
        _check_file_name(name, where)
    missing = sorted(join(pack_folder, n) for n in names if join(pack_folder, n) not in at.files)
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


def _download_pack(at: Snapshot, pack_folder: str, manifest: Manifest, target: Path,
                   progress: ProgressCallback) -> SkillPack:
    """Download the files a manifest names into ``target``, each checked against its sha256."""
    from skillhub.io import hub
    from skillhub.pack.format import load_pack, write_manifest

    target.mkdir(parents=True, exist_ok=True)
    for name, expected in sorted(manifest.files.items()):
        sha256, size = hub.download(at, join(pack_folder, name), target / name, durable=True,
                                    max_bytes=expected["bytes"], progress=progress)
        if sha256 != expected["sha256"] or size != expected["bytes"]:
            raise PackError(
                f"{at.repo_id}@{at.revision}/{join(pack_folder, name)} does not match the sha256 and size in its "
                "manifest: the file was damaged or tampered with; nothing was registered"
            )
    manifest = Manifest(manifest, source={"repo": at.repo_id, "revision": at.revision, "commit": at.commit,
                                          "path": pack_folder})
    write_manifest(target, manifest)
    # Hashes were checked while downloading and the manifest against its schema before.
    return load_pack(target, verify=False, checked_manifest=manifest)


@dataclass(frozen=True)
class PulledPack(Result):
    """One pack of a pull: its folder in the repo, and what happened to it."""

    path: str
    name: str
    version: str
    status: str  # "added", "present" (already registered) or "downloaded" (--no-register)
    entry: PackEntry | None = None


@dataclass(frozen=True)
class PullResult(Result):
    """What a pull fetched, from which commit, and where it went."""

    repo: str
    revision: str
    commit: str
    packs: tuple[PulledPack, ...]
    output: str | None = None  # --no-register: the directory written
    scores: tuple[dict[str, Any], ...] = ()

    @property
    def added(self) -> list[PackEntry]:
        """Registry entries of the packs this pull added, in lineage order."""
        return [p.entry for p in self.packs if p.status == "added" and p.entry is not None]


def _pull_to_directory(at: Snapshot, folder: str, plan: _Plan, output: str | os.PathLike[str] | None, *,
                       force: bool, progress: ProgressCallback) -> PullResult:
    from skillhub.io.outputs import staged_directory

    default = at.repo_id.split("/")[1] if plan.lineage is not None else plan.packs[0][1]["name"]
    output = Path(output) if output else Path.cwd() / default
    packs = []
    with staged_directory(output, force=force, kind="pull") as staging:
        for pack_folder, manifest in plan.packs:
            target = staging / pack_folder if plan.lineage is not None else staging
            _download_pack(at, join(folder, pack_folder), manifest, target, progress)
            packs.append(PulledPack(pack_folder, manifest.name, manifest.version, "downloaded"))
    return PullResult(at.repo_id, at.revision, at.commit, tuple(packs), output=str(output))


def _pull_into_registry(at: Snapshot, folder: str, plan: _Plan, staging: Path, registry: Registry, *,
                        base: str | None, new_base: bool, base_location: str | None,
                        progress: ProgressCallback) -> PullResult:
    packs, opened, tasks = [], [], []
    for index, (pack_folder, manifest) in enumerate(plan.packs):
        summary = (pack_folder, manifest.name, manifest.version)
        present = _registered(registry, manifest.tensors_sha256)
        if present is not None:
            packs.append(PulledPack(*summary, "present", present))
            continue
        opened.append(_download_pack(at, join(folder, pack_folder), manifest, staging / f"{index:04d}", progress))
        tasks.append(plan.lineage["packs"][index]["task"] if plan.lineage is not None else None)
        packs.append(PulledPack(*summary, "added"))
    task_sets = {}
    if plan.lineage is not None:
        sha_of = {p["path"]: p["sha256"] for p in plan.lineage["packs"]}
        task_sets = {task: [sha_of[f] for f in members] for task, members in plan.lineage["tasks"].items()}
    entries = iter(registry.add_lineage(opened, tasks=tasks, task_sets=task_sets, base=base, new_base=new_base,
                                        base_location=base_location, adopt=True) if opened else [])
    packs = [replace(p, entry=next(entries)) if p.status == "added" else p for p in packs]
    return PullResult(at.repo_id, at.revision, at.commit, tuple(packs))


def _registered(registry: Registry, sha256: str) -> PackEntry | None:
    from skillhub.errors import NotFoundError

    try:
        entry = registry.show(sha256[:12])
    except NotFoundError:
        return None
    return entry if entry.state == "active" and entry.sha256 == sha256 else None
