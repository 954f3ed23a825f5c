"""Activation (paper Eq. 9/10): theta = theta_base + sum of decoded packs, written as a Hugging Face
checkpoint (:func:`apply_packs`) or patched into a loaded model in place (:func:`patched`).

Every output tensor is computed in float32 from the pristine base tensor plus the decoded
deltas of the packs that touch it, then cast once to the base tensor's dtype. Nothing is
ever subtracted, so the result depends only on the set of packs, never on history.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from skillhub.errors import MismatchError, SkillhubError
from skillhub.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, Fingerprint, open_checkpoint
from skillhub.io.outputs import check_output, staged_directory
from skillhub.pack.format import SkillPack, load_pack
from skillhub.progress import ProgressCallback, no_progress, reporting
from skillhub.io.tensorfile import TensorFileWriter

_log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses


def _check_fits(base: Checkpoint, packs: Sequence[SkillPack]) -> None:
    # Cheap structural checks first; the fingerprint (which needs every byte) is checked as we stream.
    seen: dict[str, str] = {}
    for pack in packs:
        sha256 = pack.manifest.tensors_sha256
        if sha256 in seen:
            raise SkillhubError(f"pack {pack.name} ({pack.path}) is given twice (also as {seen[sha256]}): "
                                "its delta would be added twice")
        seen[sha256] = str(pack.path)
        pack.check_decodable()
        recorded = pack.manifest.base
        if recorded.model_type != base.model_type or recorded.architecture != base.architecture:
            raise MismatchError(f"pack {pack.name} was made for a {recorded.architecture} base, not {base.architecture}")
        for module, entry in pack.modules.items():
            if module not in base or tuple(base.shape(module)) != entry.shape:
                raise MismatchError(
                    f"pack {pack.name} changes {module} {list(entry.shape)}, which the base "
                    f"{'lacks' if module not in base else 'has with shape ' + str(list(base.shape(module)))}"
                )


def _shard_plan(base: Checkpoint, max_shard_bytes: int) -> dict[str, str]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in base.names():
        nbytes = base.dtype(name).itemsize * int(torch.Size(base.shape(name)).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return {name: SINGLE_FILE for name in shards[0]}
    count = len(shards)
    return {
        name: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, names in enumerate(shards) for name in names
    }


def apply_packs(
    base: str | os.PathLike[str] | Checkpoint,
    packs: Sequence[str | os.PathLike[str] | SkillPack],
    output: str | os.PathLike[str],
    *,
    base_revision: str | None = None,
    force: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressCallback = no_progress,
) -> Path:
    """Write ``base + sum(packs)`` as a Hugging Face checkpoint directory.

    The output holds the weights (sharded above ``max_shard_bytes``) plus the base's config
    and tokenizer files, so ``AutoModelForCausalLM.from_pretrained(output)`` loads it.

    Args:
        base: Base model directory or Hub id (or an open Checkpoint).
        packs: Pack directories or opened packs; an empty list copies the base.
        output: Directory to create.
        base_revision: Hub revision of ``base``.
        force: Replace ``output`` if it exists (and skillhub wrote it).
        protect: More paths the output must stay clear of (e.g. the registry), besides the
            base and the packs (see :mod:`skillhub.io.outputs`).
        max_shard_bytes: Largest weight file to write.
        progress: Called as ``progress("apply", done, total)``.

    Returns:
        ``output``.

    Raises:
        MismatchError: A pack was made for another base (architecture, shapes or fingerprint).
        PackError: A pack is missing or corrupt.
    """
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base, revision=base_revision)
    opened = [p if isinstance(p, SkillPack) else load_pack(p) for p in packs]
    protect = [base_ckpt.path, *(p.path for p in opened), *protect]
    check_output(output, force=force, protect=protect)
    _check_fits(base_ckpt, opened)
    plan = _shard_plan(base_ckpt, max_shard_bytes)
    with staged_directory(output, force=force, protect=protect, kind="checkpoint") as staging:
        sizes = _write_weights(base_ckpt, opened, plan, staging, progress)
        if len(sizes) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": plan}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for sidecar in base_ckpt.sidecar_files():
            shutil.copy2(sidecar, staging / sidecar.name)
    _log.info("wrote %s: %s + %d pack(s) in %d weight file(s)", output, base_ckpt.ref.id, len(opened), len(sizes))
    return Path(output)


def with_deltas(base_tensor: torch.Tensor, packs: Sequence[SkillPack], name: str) -> torch.Tensor:
    """theta_base + sum of the packs' decoded deltas for one parameter: the one summation of
    skillhub. In float32, in the packs' order, cast once to the base dtype; the base tensor
    itself when no pack changes the parameter."""
    touching = [p for p in packs if name in p.modules]
    if not touching:
        return base_tensor
    weight = base_tensor.to(torch.float32)
    for pack in touching:
        weight = weight + pack.decode(name).to(weight.device)
    return weight.to(base_tensor.dtype)


def _write_weights(base: Checkpoint, packs: Sequence[SkillPack], plan: dict[str, str], staging: Path,
                   progress: ProgressCallback) -> dict[str, int]:
    """Stream every base tensor plus its deltas into the planned shards; returns bytes per shard.
    The base fingerprint, computed on the way, must be the one every pack was made for."""
    fingerprint = Fingerprint()
    writers: dict[str, TensorFileWriter] = {}
    metadata = {"format": "pt", "skillhub_packs": json.dumps([f"{p.name}@{p.version}" for p in packs])}
    names = base.names()
    try:
        for name in reporting(names, progress, "apply", len(names)):
            base_tensor = base.read(name)
            fingerprint.update(name, base_tensor)
            if plan[name] not in writers:
                writers[plan[name]] = TensorFileWriter(staging / plan[name])
            writers[plan[name]].add(name, with_deltas(base_tensor, packs, name))
        actual = fingerprint.hexdigest()
        for pack in packs:
            if pack.base_fingerprint != actual:
                raise MismatchError(
                    f"pack {pack.name} was made for base fingerprint {pack.base_fingerprint}, but "
                    f"{base.ref.id} has {actual}: use the exact base model the pack was created from"
                )
        for writer in writers.values():
            writer.finish(metadata)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {shard: writer.data_bytes for shard, writer in writers.items()}


@contextmanager
def patched(model: torch.nn.Module, packs: Sequence[SkillPack]) -> Iterator[torch.nn.Module]:
    """Patch a loaded model with the packs' deltas in place; restore its exact bits on exit.

    Each patched weight is computed from a saved copy of the original (never by subtracting),
    so switching from one set of packs to another never accumulates error.

    Raises:
        MismatchError: The model lacks a parameter the packs change.
        PackError, OperatorError: A pack cannot be decoded.
    """
    for pack in packs:
        pack.check_decodable()
    parameters = dict(model.named_parameters())
    touched = sorted({name for pack in packs for name in pack.modules})
    missing = [n for n in touched if n not in parameters]
    if missing:
        raise MismatchError(f"the model has no parameter(s) {', '.join(missing[:5])} that the packs change")
    originals = {name: parameters[name].detach().clone() for name in touched}
    try:
        with torch.no_grad():
            for name in touched:
                parameters[name].copy_(with_deltas(originals[name], packs, name))
        yield model
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                parameters[name].copy_(original)


def check_model_is_base(model: torch.nn.Module, fingerprint: str, name: str) -> None:
    """Check that a loaded model holds exactly the base weights whose fingerprint is ``fingerprint``.

    Raises:
        MismatchError: It does not (another model, or loaded in another dtype).
    """
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: not a tensor of its own in the checkpoint
    digest = Fingerprint()
    for parameter, tensor in state.items():
        digest.update(parameter, tensor)
    if digest.hexdigest() != fingerprint:
        raise MismatchError(
            f"the model's weights are not the registered base {name}: load it unchanged, in its "
            "stored dtype (or pass verify=False)"
        )
