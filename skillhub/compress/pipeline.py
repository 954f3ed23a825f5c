"""Building a SkillPack, in named stages: open the inputs, prepare calibration, plan every
module (recipe or budget mode), encode module by module while the delta streams, write the
manifest. Each stage is a function below :func:`create_pack`; ``encode_module`` (one
operator on one delta) is the seam where parallel workers will plug in."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from skillhub import __version__, config
from skillhub.io.memory import large_blocks_mapped, return_freed_memory
from skillhub.compress.budget import budget_recipe, check_ratio, plan_budget
from skillhub.compress.windows import build_calibration_set
from skillhub.compress.calibrate import (
    StatisticsCursor,
    capture_statistics,
    check_activation_memory,
    layer_index,
    layer_order,
    load_for_calibration,
)
from skillhub.compress.workers import (
    EncodeJob,
    EncodeResult,
    Executor,
    ProcessExecutor,
    check_workers,
    run_in_order,
    run_streamed,
)
from skillhub.pack.card import render_card
from skillhub.compress.delta import RowBlocks, check_compatible, iter_deltas, read_delta, read_in_blocks
from skillhub.errors import SkillhubError
from skillhub.pack.manifest import FORMAT_VERSION, check_pack_identity, totals
from skillhub.io.checkpoint import Checkpoint, Fingerprint, open_checkpoint
from skillhub.operators import EncodeContext, LayerStatistics, Split, provenance
from skillhub.operators.parts import part_statistics
from skillhub.io.outputs import check_output, staged_directory
from skillhub.pack.format import PackWriter, SkillPack, load_pack
from skillhub.progress import ProgressCallback, no_progress, reporting
from skillhub.compress.recipe import ModulePlan, Recipe
from skillhub.compress.roles import CALIBRATED_ROLES
from skillhub.compress.splits import split_for
from skillhub.io.tensorfile import dtype_name


_log = logging.getLogger(__name__)


def _parent_reference(parent: str | os.PathLike[str] | None) -> dict[str, str] | None:
    if parent is None:
        return None
    pack = load_pack(parent)
    return {"name": pack.name, "version": pack.version, "sha256": pack.manifest.tensors_sha256}


_POSITIONS = re.compile(r"(^|\.)(wpe|\w*position\w*)\.")  # learned position embeddings: never tied to the head


def tied_embedding(recipe: Recipe, checkpoint: Checkpoint) -> str | None:
    """The word embedding a tied model shares with its output head: no head tensor on disk, and the
    one embedding matrix with a row per vocabulary entry (not GPT-2's position embeddings)."""
    if not checkpoint.tie_word_embeddings:
        return None
    vocab = checkpoint.vocab_size
    roles = {n: recipe.role(n, model_type=checkpoint.model_type, ndim=len(checkpoint.shape(n)))
             for n in checkpoint.names()}
    if "head" in roles.values():
        return None
    words = [n for n, role in roles.items() if role == "embedding" and len(checkpoint.shape(n)) == 2
             and checkpoint.shape(n)[0] == vocab and not _POSITIONS.search(n)]
    return words[0] if len(words) == 1 else None


def plan_every_parameter(recipe: Recipe, checkpoint: Checkpoint) -> dict[str, ModulePlan]:
    """Every parameter's operator, parameters, role and split, from the checkpoint's headers."""
    plans = {}
    tied = tied_embedding(recipe, checkpoint)
    for name in checkpoint.names():
        shape = checkpoint.shape(name)
        plan = recipe.plan(name, model_type=checkpoint.model_type, ndim=len(shape), tied=name == tied)
        split = split_for(name, role=plan.role, shape=shape, config=checkpoint.config, fused=recipe.split_fused)
        plans[name] = replace(plan, split=split) if split else plan
    return plans


def _tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as exc:
        raise SkillhubError(f"{checkpoint.path} has no usable tokenizer for the calibration text: {exc}") from exc


def make_executor(workers: int = 1, *, executor: str = "local", ray_address: str | None = None) -> Executor:
    """The executor ``create`` was asked for; check everything before any work starts.

    Raises:
        SkillhubError: A bad worker count, an unknown executor, or a Ray cluster that cannot be reached.
    """
    check_workers(workers)
    if executor == "ray":
        from skillhub.compress.ray_executor import RayExecutor  # the optional extra: imported when asked for

        return RayExecutor(workers, address=ray_address)
    if executor != "local":
        raise SkillhubError(f"unknown executor {executor!r}: use 'local' or 'ray'")
    if ray_address is not None:
        raise SkillhubError("--ray-address needs --executor ray")
    return ProcessExecutor(workers) if workers > 1 else Executor()


def _checkpoint(ref: str | os.PathLike[str] | Checkpoint, revision: str | None) -> Checkpoint:
    return ref if isinstance(ref, Checkpoint) else open_checkpoint(ref, revision=revision)


def create_pack(
    base: str | os.PathLike[str] | Checkpoint,
    tuned: str | os.PathLike[str] | Checkpoint,
    output: str | os.PathLike[str],
    *,
    task: str | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    recipe: str | os.PathLike[str] | dict[str, Any] = "paper",
    parent: str | os.PathLike[str] | None = None,
    base_revision: str | None = None,
    tuned_revision: str | None = None,
    ratio: float | None = None,
    calib: str | os.PathLike[str] | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    device: str | None = None,
    workers: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    seed: int = 0,
    force: bool = False,
    provenance: dict[str, Any] | None = None,
    progress: ProgressCallback = no_progress,
) -> SkillPack:
    """Compress ``tuned - base`` into a SkillPack directory at ``output``.

    The recipe is resolved and checked, and the two checkpoints compared, before any
    tensor is read; tensors are then streamed one at a time.

    Args:
        base: Base model directory or Hub id (or an open Checkpoint).
        tuned: Fine-tuned model directory or Hub id.
        output: Pack directory to create.
        task: Task the pack teaches (default: the pack name).
        name: Pack name (default: the output directory's name).
        version: Pack version.
        recipe: ``"paper"``, a recipe JSON file, or a recipe dict (its roles still apply in budget mode).
        ratio: Budget mode: choose every module's settings so the pack stores at most
            ``ratio`` x the fp16 delta bytes (see :mod:`skillhub.compress.budget`).
        parent: Pack directory this pack was trained on top of (lineage).
        base_revision: Hub revision of ``base``.
        tuned_revision: Hub revision of ``tuned``.
        calib: Calibration file (JSONL with ``text`` or ``prompt`` fields, or plain text). With it,
            SVD factors are quantized with GPTQ against the tuned model's layer inputs;
            without it, round-to-nearest (recorded in the manifest).
        calib_samples: Calibration windows.
        calib_seqlen: Tokens per window.
        device: Where the compression maths runs (``cpu``, ``cuda``...; default ``$SKILLHUB_DEVICE``, else cpu).
        workers: Modules encoded at once, each in its own process (1: in this one); see
            :mod:`skillhub.compress.workers`. The pack is byte-identical whatever the count.
        executor: ``"local"`` (this machine) or ``"ray"`` (jobs sent to a Ray cluster, ``workers`` at a time).
        ray_address: The Ray cluster to join (default: ``$RAY_ADDRESS``, else a local Ray started for this call).
        seed: Seed of randomized operators.
        force: Replace ``output`` if it exists.
        provenance: How the tuned model was made, recorded as the manifest's ``graft`` (see
            :mod:`skillhub.graft`).
        progress: Called as ``progress("compress", done, total)``.

    Returns:
        The written pack, opened.

    Raises:
        SkillhubError: Any problem with the inputs; nothing is written then.
    """
    output = Path(output)
    if ratio is not None:
        check_ratio(ratio)
    check_workers(workers)
    config.stream_above_bytes()  # a bad $SKILLHUB_STREAM_ABOVE_MIB is refused before anything is read
    plan_recipe = Recipe(recipe)
    inputs = _Inputs.open(base, tuned, base_revision=base_revision, tuned_revision=tuned_revision)
    protect = [inputs.base.path, inputs.tuned.path, parent, calib,
               recipe if isinstance(recipe, (str, os.PathLike)) and recipe != "paper" else None]
    check_output(output, force=force, protect=protect)
    name = name or output.name
    task = task or name
    check_pack_identity(name=name, task=task, version=version)
    plans = plan_every_parameter(plan_recipe, inputs.base)  # every parameter has an operator: checked first
    identity = {"name": name, "task": task, "version": version, "parent": _parent_reference(parent),
                "provenance": provenance}
    torch_device = _device(device or config.default_device())
    calibration = Calibration.prepare(inputs.tuned, calib, samples=calib_samples, seqlen=calib_seqlen,
                                      device=torch_device)
    if ratio is not None:
        plans, plan_recipe, budget = _plan_budget(inputs, plans, plan_recipe, ratio, calibration, torch_device, seed,
                                                   progress)
    else:
        budget = None
    engine = make_executor(workers, executor=executor, ray_address=ray_address)  # checked before any output
    try:
        with staged_directory(output, force=force, protect=protect, kind="pack") as staging:
            writer = PackWriter(staging)
            encoded = _encode_all(inputs, plans, writer, calibration.cursor(progress), torch_device, seed, progress,
                                      engine)
            manifest = _manifest(identity, inputs, plan_recipe, plans, encoded, calibration.quantizer, budget)
            writer.finish(manifest, render_card(manifest))
    finally:
        engine.close()
    return load_pack(output, verify=False)


@dataclass(frozen=True)
class _Inputs:
    """Stage 1: the two checkpoints, opened (headers only) and checked to fit together."""

    base: Checkpoint
    tuned: Checkpoint

    @classmethod
    def open(cls, base: str | os.PathLike[str] | Checkpoint, tuned: str | os.PathLike[str] | Checkpoint, *,
             base_revision: str | None, tuned_revision: str | None) -> _Inputs:
        opened = cls(_checkpoint(base, base_revision), _checkpoint(tuned, tuned_revision))
        check_compatible(opened.base, opened.tuned)
        return opened


def _device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise SkillhubError(f"device {device!r} is not usable here: {exc}") from exc
    return torch_device


@dataclass
class Calibration:
    """Stage 2: the calibration text and the tuned model it runs through (or none: round-to-nearest)."""

    quantizer: dict[str, Any]
    windows: Any = None
    model: Any = None

    @classmethod
    def prepare(cls, tuned: Checkpoint, calib: str | os.PathLike[str] | None, *, samples: int, seqlen: int,
                device: torch.device) -> Calibration:
        if calib is None:
            return cls({"method": "rtn", "note": "no calibration data: factors quantized by round-to-nearest"})
        check_activation_memory(tuned.config, samples=samples, seqlen=seqlen)
        windows = build_calibration_set(calib, _tokenizer(tuned), samples=samples, seqlen=seqlen,
                                        vocab_size=tuned.vocab_size)
        _log.info("calibration: %d windows of %d tokens from %s", samples, seqlen, calib)
        return cls({"method": "gptq", "calibration": windows.source}, windows,
                   load_for_calibration(tuned, device=str(device)))

    def cursor(self, progress: ProgressCallback = no_progress) -> StatisticsCursor | None:
        """A fresh pass of layer-by-layer statistics over the tuned model (None without calibration)."""
        if self.windows is None:
            return None
        return StatisticsCursor(capture_statistics(self.model, self.windows, progress=progress))


def _plan_budget(inputs: _Inputs, plans: dict[str, ModulePlan], roles_from: Recipe, ratio: float,
                 calibration: Calibration, device: torch.device, seed: int,
                 progress: ProgressCallback) -> tuple[dict[str, ModulePlan], Recipe, dict[str, Any]]:
    """Stage 3 with --ratio: budget mode chooses every module's settings (the recipe gave the roles)."""
    planning = iter_deltas(inputs.base, inputs.tuned, names=layer_order(list(plans)))
    chosen, budget = plan_budget(
        reporting(planning, progress, "plan", len(plans)),
        roles={n: p.role for n, p in plans.items()},
        numels={n: math.prod(inputs.base.shape(n)) for n in plans},
        ratio=ratio, splits={n: p.split for n, p in plans.items() if p.split}, statistics=calibration.cursor(),
        device=device, seed=seed, tied=tied_embedding(roles_from, inputs.base),
    )
    _log.info("budget mode: %d of %d target bytes planned", budget["planned_bytes"], budget["target_bytes"])
    description = f"chosen by budget mode for ratio {ratio} ({budget['weighting']} weighting)"
    recipe = Recipe(budget_recipe(f"budget-{ratio:g}", chosen, description,
                                  split_fused=roles_from.split_fused))
    return plan_every_parameter(recipe, inputs.base), recipe, budget


def _without_statistics(name: str, statistics: LayerStatistics | None, split: Split | None) -> list[str]:
    """``name`` if calibration has nothing for it, else ``name#part`` for each expert of a 3-D stack
    that no calibration token was routed to."""
    if statistics is None:
        return [name]
    if split is None or statistics.hessian.dim() == 2:
        return []
    return [f"{name}#{part}" for part in range(len(split.sizes)) if part_statistics(statistics, split, part) is None]


@dataclass
class _Encoded:
    """What stage 4 produced: per-module manifest entries and whole-delta statistics."""

    modules: dict[str, dict[str, Any]]
    unchanged: list[str]
    uncalibrated: list[str]  # layer matrices calibration had no statistics for (with --calib)
    fingerprint: str
    parameters: int
    squared_error: float
    squared_norm: float


def _encode_all(inputs: _Inputs, plans: dict[str, ModulePlan], writer: PackWriter, cursor: StatisticsCursor | None,
                device: torch.device, seed: int, progress: ProgressCallback, executor: Executor) -> _Encoded:
    """Stage 4: layer by layer, read each module's delta, encode it (on ``executor``: a layer's
    largest modules first), and write the layer's modules in name order, whatever finished first."""
    base = inputs.base
    encoded = _Encoded({}, [], [], "", 0, 0.0, 0.0)
    fingerprint = Fingerprint()
    results: dict[str, EncodeResult] = {}
    done = itertools.count(1)

    def job(name: str) -> Callable[[], EncodeJob | None]:
        def make() -> EncodeJob | None:  # called when a slot is free: one delta per slot in memory
            plan = plans[name]
            encoded.parameters += math.prod(base.shape(name))
            # First: a layer's first module makes the cursor capture that layer, which holds the most
            # memory of the whole run (a layer, its Hessians, the activations); no delta waits meanwhile.
            statistics = cursor.get(name) if cursor else None
            if read_in_blocks(plan, base, inputs.tuned, name):
                delta: torch.Tensor | RowBlocks = RowBlocks(base, inputs.tuned, name, fingerprint=fingerprint)
                changed = delta.changed()
            else:
                delta = read_delta(base, inputs.tuned, name, fingerprint).delta
                changed = bool(torch.any(delta))
            if not changed:
                encoded.unchanged.append(name)
                progress("compress", next(done), len(plans))
                return None
            if cursor is not None and plan.role in CALIBRATED_ROLES:
                encoded.uncalibrated.extend(_without_statistics(name, statistics, plan.split))
            if isinstance(delta, RowBlocks):  # encoded here and now, whatever the executor
                finished(run_streamed(plan.operator, plan.params, delta, EncodeContext(name, plan.role, seed=seed)))
                return None
            return EncodeJob(name=name, role=plan.role, operator=plan.operator.name, params=plan.params,
                             delta=delta, statistics=statistics, split=plan.split, seed=seed, device=str(device))
        return make

    def finished(result: EncodeResult) -> None:
        results[result.name] = result
        progress("compress", next(done), len(plans))

    order = layer_order(list(plans))
    for layer in _by_layer(order):
        # Largest first (workers balance best so); among equal sizes the widest input first: its
        # Hessian, freed once the module is encoded, is the layer's largest (down_proj's 14336^2
        # floats, 0.77 GiB at 8B), so the layer's other modules are encoded without it.
        largest_first = sorted(layer, key=lambda n: (-math.prod(base.shape(n)), -base.shape(n)[-1]))
        calibrated = cursor is not None and layer_index(layer[0]) is not None
        with large_blocks_mapped() if calibrated else contextlib.nullcontext():
            run_in_order(executor, (job(name) for name in largest_first), finished)
        for name in layer:  # the serial order: the pack's bytes do not depend on the executor
            if name in results:
                encoded.modules[name] = _module_entry(results.pop(name), plans[name], base, writer, encoded)
        return_freed_memory()
    position = {name: index for index, name in enumerate(order)}
    encoded.unchanged.sort(key=position.__getitem__)
    encoded.fingerprint = fingerprint.hexdigest()
    _log.info("compressed %d modules (%d unchanged)", len(encoded.modules), len(encoded.unchanged))
    if encoded.uncalibrated:
        _log.warning("%d layer matrices (of %d modules) had no calibration statistics, so their operators ran "
                     "without (svd-mixed: round-to-nearest); they are listed in the manifest's quantizer.uncalibrated "
                     "(NAME#EXPERT: an expert no calibration token was routed to), e.g. %s",
                     len(encoded.uncalibrated),
                     sum(encoded.modules[n]["role"] in CALIBRATED_ROLES for n in encoded.modules),
                     encoded.uncalibrated[0])
    return encoded


def _by_layer(names: list[str]) -> Iterator[list[str]]:
    """Consecutive runs of names (in layer order) that share a decoder layer (or lie outside all)."""
    for _, group in itertools.groupby(names, key=layer_index):
        yield list(group)


def _module_entry(result: EncodeResult, plan: ModulePlan, base: Checkpoint, writer: PackWriter,
                  encoded: _Encoded) -> dict[str, Any]:
    """Write one module's tensors and make its manifest entry."""
    shape = base.shape(result.name)
    encoded.squared_error += result.error_norm**2
    encoded.squared_norm += result.delta_norm**2
    return {
        "role": plan.role, "operator": plan.operator.name, "operator_version": plan.operator.version,
        "params": plan.params, "meta": result.meta, "shape": list(shape),
        "dtype": dtype_name(base.dtype(result.name)), "fields": list(result.tensors),
        "stored_bytes": writer.add_module(result.name, result.tensors),
        "delta_fp16_bytes": 2 * math.prod(shape),
        "error": result.error_norm / result.delta_norm if result.delta_norm else 0.0,
        **({"split": plan.split.as_json()} if plan.split else {}),
    }


def _manifest(identity: dict[str, Any], inputs: _Inputs, recipe: Recipe, plans: dict[str, ModulePlan],
              encoded: _Encoded, quantizer: dict[str, Any], budget: dict[str, Any] | None) -> dict[str, Any]:
    """Stage 5: the manifest (files are added when the pack is written)."""
    base, tuned = inputs.base, inputs.tuned
    return {
        "format": "skillpack",
        "format_version": FORMAT_VERSION,
        **{key: identity[key] for key in ("name", "task", "version")},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "skillhub_version": __version__,
        "parent": identity["parent"],
        "base": {
            "id": base.ref.id, "revision": base.ref.revision, "architecture": base.architecture,
            "model_type": base.model_type, "fingerprint": encoded.fingerprint, "dtype": base.dominant_dtype(),
            "tie_word_embeddings": base.tie_word_embeddings,
        },
        "tuned": {"id": tuned.ref.id, "revision": tuned.ref.revision},
        "recipe": recipe.document,
        "operators": {p.operator.name: provenance(p.operator)
                      for p in sorted(plans.values(), key=lambda p: p.operator.name) if p.name in encoded.modules},
        "quantizer": {**quantizer, "uncalibrated": encoded.uncalibrated} if encoded.uncalibrated else quantizer,
        **({"budget": budget} if budget else {}),
        **({"graft": identity["provenance"]} if identity["provenance"] else {}),
        "modules": encoded.modules,
        "unchanged": encoded.unchanged,
        "totals": totals(encoded.modules, parameters=encoded.parameters, delta_fp16_bytes=2 * encoded.parameters,
                         squared_error=encoded.squared_error, squared_norm=encoded.squared_norm),
    }
