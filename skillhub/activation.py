"""Activation (paper Eq. 9/10): theta = theta_base + sum of decoded packs, written as a Hugging Face
checkpoint (:func:`apply_packs`) or patched into a loaded model in place (:func:`patched`,
:class:`Patcher`); or, when one static model must hold several packs, theta_base + a merge of
their deltas (:class:`Merge`: task arithmetic, TIES, DARE).

Every output tensor is computed in float32 from the pristine base tensor plus the decoded
deltas of the packs that touch it, then cast once to the base tensor's dtype. Nothing is
ever subtracted, so the result depends only on the set of packs, never on history.

The merge algorithms are PEFT's (``peft.utils.merge_utils``), applied module by module to the
decoded deltas as they stream; skillhub only chooses their inputs and validates parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from skillhub.errors import MismatchError, SkillhubError
from skillhub.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, Fingerprint, open_checkpoint
from skillhub.io.layout import CheckpointLayout, checkpoint_tensors
from skillhub.io.memory import return_freed_memory
from skillhub.io.outputs import check_output, staged_directory
from skillhub.pack.format import SkillPack, load_pack
from skillhub.progress import ProgressCallback, no_progress, reporting
from skillhub.io.tensorfile import TensorFileWriter

_log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses
MERGE_METHODS = ("sum", "task-arithmetic", "ties", "dare-linear", "dare-ties")


@dataclass(frozen=True)
class Merge:
    """How the deltas of several packs are combined into one static model.

    - ``sum``: theta_base + sum of the deltas (Eq. 9 without routing); the default.
    - ``task-arithmetic``: theta_base + lambda * sum_i w_i delta_i (Ilharco et al. 2023).
    - ``ties``: trim each delta to its top ``density`` fraction by magnitude, elect a sign per
      entry, average the agreeing entries, times lambda (Yadav et al. 2023).
    - ``dare-linear`` / ``dare-ties``: drop entries at random keeping ``density`` and rescale
      by 1/density, then sum / TIES-merge (Yu et al. 2024). The drop is seeded per module
      from ``seed`` and the parameter name, so a merge is reproducible.

    Args:
        method: One of MERGE_METHODS.
        weights: One weight per pack, in the packs' order (default 1.0 each).
        density: Fraction of entries kept by TIES and DARE, in (0, 1].
        scale: lambda, the factor on the merged delta, in (0, 10].
        seed: Seed of DARE's random drop.

    Raises:
        SkillhubError: A parameter is out of range.
    """

    method: str = "sum"
    weights: tuple[float, ...] | None = None
    density: float = 0.5
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise SkillhubError(f"unknown merge method {self.method!r}: use one of {', '.join(MERGE_METHODS)}")
        if not (0 < self.density <= 1):
            raise SkillhubError(f"--density must be in (0, 1], not {self.density}")
        if not (0 < self.scale <= 10) or not math.isfinite(self.scale):
            raise SkillhubError(f"--lambda must be in (0, 10], not {self.scale}")
        if self.weights is not None:
            if not all(math.isfinite(w) and -10 <= w <= 10 for w in self.weights):
                raise SkillhubError(f"--weights must be finite numbers in [-10, 10], not {list(self.weights)}")
            if not any(self.weights):
                raise SkillhubError("--weights are all zero: the merge would be the base model")
        if self.method == "sum" and (self.density != 0.5 or self.scale != 1.0):
            raise SkillhubError("--density and --lambda apply to task-arithmetic, ties and dare merges, not sum")

    @property
    def is_plain_sum(self) -> bool:
        return self.method == "sum" and (self.weights is None or all(w == 1.0 for w in self.weights))

    def check_count(self, count: int) -> None:
        """Raises SkillhubError unless there is one weight per pack."""
        if self.weights is not None and len(self.weights) != count:
            raise SkillhubError(f"--weights gives {len(self.weights)} weight(s) for {count} pack(s): give one per pack")

    def combine(self, deltas: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """The merged delta of one parameter (``deltas``: one float32 tensor per pack, zeros
        for a pack that leaves the parameter alone)."""
        from peft.utils import merge_utils

        deltas = list(deltas)
        weights = torch.tensor(self.weights if self.weights is not None else [1.0] * len(deltas),
                               dtype=torch.float32, device=deltas[0].device)
        if self.method in ("sum", "task-arithmetic"):
            return self.scale * merge_utils.task_arithmetic(deltas, weights)
        merge = {"ties": merge_utils.ties, "dare-linear": merge_utils.dare_linear, "dare-ties": merge_utils.dare_ties}
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little") >> 1
        # DARE's drop draws from the global generator: fork it, so a merge never disturbs the caller's.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings("ignore", message="The density .* no pruning")  # density 1: PEFT keeps all
            return self.scale * merge[self.method](deltas, weights, self.density)

    def describe(self) -> dict[str, object]:
        """The merge as JSON-ready settings (recorded in the checkpoint's safetensors metadata)."""
        return {"method": self.method, "weights": list(self.weights) if self.weights else None,
                "density": self.density, "lambda": self.scale, "seed": self.seed}


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
    merge: Merge | None = None,
    progress: ProgressCallback = no_progress,
) -> Path:
    """Write ``base + sum(packs)`` (or a merge of them) as a Hugging Face checkpoint directory.

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
        merge: How to combine several packs (default: the plain sum).
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
    if merge is not None:
        merge.check_count(len(opened))
    plan = _shard_plan(base_ckpt, max_shard_bytes)
    with staged_directory(output, force=force, protect=protect, kind="checkpoint") as staging:
        sizes = _write_weights(base_ckpt, opened, plan, staging, merge, progress)
        if len(sizes) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": plan}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for sidecar in base_ckpt.sidecar_files():
            shutil.copy2(sidecar, staging / sidecar.name)
    _log.info("wrote %s: %s + %d pack(s) in %d weight file(s)", output, base_ckpt.ref.id, len(opened), len(sizes))
    return Path(output)


def with_deltas(base_tensor: torch.Tensor, packs: Sequence[SkillPack], name: str, merge: Merge | None = None) -> torch.Tensor:
    """theta_base + the packs' decoded deltas for one parameter: the one summation of skillhub.

    In float32, in the packs' order, cast once to the base dtype; the base tensor itself when
    no pack changes the parameter. With a ``merge`` other than the plain sum, the deltas are
    combined by :meth:`Merge.combine` (a pack that leaves the parameter alone counts as zeros).
    """
    touching = [p for p in packs if name in p.modules]
    if not touching:
        return base_tensor
    weight = base_tensor.to(torch.float32)
    if merge is None or merge.is_plain_sum:
        for pack in touching:
            weight = weight + pack.decode(name).to(weight.device)
    else:
        deltas = [p.decode(name).to(weight.device) if name in p.modules else torch.zeros_like(weight) for p in packs]
        weight = weight + merge.combine(deltas, name)
    return weight.to(base_tensor.dtype)


def _write_weights(base: Checkpoint, packs: Sequence[SkillPack], plan: dict[str, str], staging: Path,
                   merge: Merge | None, progress: ProgressCallback) -> dict[str, int]:
    """Stream every base tensor plus its deltas into the planned shards; returns bytes per shard.
    The base fingerprint, computed on the way, must be the one every pack was made for."""
    fingerprint = Fingerprint()
    writers: dict[str, TensorFileWriter] = {}
    metadata = {"format": "pt", "skillhub_packs": json.dumps([f"{p.name}@{p.version}" for p in packs])}
    if merge is not None and not merge.is_plain_sum:
        metadata["skillhub_merge"] = json.dumps(merge.describe())
    names = base.names()
    try:
        for name in reporting(names, progress, "apply", len(names)):
            base_tensor = base.read(name)
            fingerprint.update(name, base_tensor)
            if plan[name] not in writers:
                writers[plan[name]] = TensorFileWriter(staging / plan[name])
            writers[plan[name]].add(name, with_deltas(base_tensor, packs, name, merge))
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
def patched(model: torch.nn.Module, packs: Sequence[SkillPack], merge: Merge | None = None) -> Iterator[torch.nn.Module]:
    """Patch a loaded model with the packs' deltas in place; restore its exact bits on exit.

    Raises:
        MismatchError: The model lacks a parameter the packs change.
        PackError, OperatorError: A pack cannot be decoded.
    """
    patcher = Patcher(model)
    try:
        patcher.use(packs, merge)
        yield model
    finally:
        patcher.restore()


class Patcher:
    """Switches a loaded model between pack sets in place, exactly.

    The model's original tensors are kept as they are (not copied): a pack set's weights are
    computed from them (never by subtracting) into new tensors, and switching swaps which
    tensor each parameter holds. So switching is exact and cheap, the base weights can be
    lent back for a moment (:meth:`base_weights`, e.g. for a router's features), and up to
    ``cache_sets`` recently used sets stay computed for the next switch back.

    Args:
        model: A loaded model holding the base weights.
        cache_sets: How many pack sets' computed weights to keep (each costs the memory of
            the parameters its packs change).
    """

    def __init__(self, model: torch.nn.Module, *, cache_sets: int = 1) -> None:
        self.model = model
        self.layout = CheckpointLayout(model)
        self.parameters = self.layout.parameters
        self.originals: dict[str, torch.Tensor] = {}
        self.cache_sets = max(1, cache_sets)
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.current: tuple = ()
        self.switches = 0  # times use() changed the model's set
        self.cache_hits = 0  # of those, times the set's weights were still computed

    def use(self, packs: Sequence[SkillPack], merge: Merge | None = None) -> None:
        """Make the model theta_base + the packs (an empty list: the base)."""
        key = (tuple(p.manifest.tensors_sha256 for p in packs), merge)
        if key == self.current:
            return
        weights = self._cache.get(key) if packs else {}
        if weights is None:
            # Make room first, so at most cache_sets sets are ever held beside the base weights.
            self._swap_in({})
            self.current = ()
            evicted = len(self._cache) >= self.cache_sets
            while len(self._cache) >= self.cache_sets:
                self._cache.popitem(last=False)
            if evicted:
                return_freed_memory()  # else the evicted set's pages stay with the process
            weights = self._compute(packs, merge)
        elif packs:
            self.cache_hits += 1
        self._swap_in(weights)
        self.switches += 1
        self.current = key if packs else ()
        if packs:
            self._cache[key] = weights
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_sets:
                self._cache.popitem(last=False)

    def restore(self) -> None:
        """Put the base weights back."""
        self._swap_in({})
        self.current = ()

    @contextmanager
    def base_weights(self) -> Iterator[torch.nn.Module]:
        """The model with its base weights for the duration of the block, then the current set again."""
        weights = {name: param.data for name, param in self.parameters.items() if name in self.originals}
        self._swap_in({})
        try:
            yield self.model
        finally:
            self._swap_in(weights)

    def _compute(self, packs: Sequence[SkillPack], merge: Merge | None) -> dict[str, torch.Tensor]:
        for pack in packs:
            pack.check_decodable()
        if merge is not None:
            merge.check_count(len(packs))
        touched = sorted({name for pack in packs for name in pack.modules})
        missing = [n for n in touched if n not in self.layout.owner]
        if missing:
            raise MismatchError(f"the model has no parameter(s) {', '.join(missing[:5])} that the packs change")
        by_parameter: dict[str, list[str]] = {}
        for key in touched:  # checkpoint names, as packs store them
            by_parameter.setdefault(self.layout.owner[key], []).append(key)
        weights = {}
        with torch.no_grad():
            for name, keys in by_parameter.items():
                original = self.originals.setdefault(name, self.parameters[name].data)
                if name in self.layout.whole:
                    weights[name] = with_deltas(original, packs, keys[0], merge)
                else:  # a fused parameter: patch the elements of each checkpoint tensor
                    weights[name] = self._patch_fused(name, original, keys, packs, merge)
        return weights

    def _patch_fused(self, name: str, original: torch.Tensor, keys: list[str], packs: Sequence[SkillPack],
                     merge: Merge | None) -> torch.Tensor:
        patched = original.clone()
        flat, source = patched.view(-1), original.reshape(-1)
        for key, index in self.layout.indices(name).items():
            if key in keys:
                where = index.reshape(-1).long()
                flat[where] = with_deltas(source[where].reshape(index.shape), packs, key, merge).reshape(-1)
        return patched

    def _swap_in(self, weights: dict[str, torch.Tensor]) -> None:
        for name, original in self.originals.items():
            self.parameters[name].data = weights.get(name, original)


def check_model_is_base(model: torch.nn.Module, fingerprint: str, name: str) -> None:
    """Check that a loaded model holds exactly the base weights whose fingerprint is ``fingerprint``.

    Raises:
        MismatchError: It does not (another model, or loaded in another dtype).
    """
    digest = Fingerprint()
    for key, tensor in checkpoint_tensors(model):  # as saved: the fingerprint is of the checkpoint
        digest.update(key, tensor)
    if digest.hexdigest() != fingerprint:
        raise MismatchError(
            f"the model's weights are not the registered base {name}: load it unchanged, in its "
            "stored dtype (or pass verify=False)"
        )
