"""Building a SkillPack: stream the delta, compress each module with its recipe's operator, write the pack."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from skillhub import __version__
from skillhub.compress.budget import budget_recipe, check_ratio, plan_budget
from skillhub.compress.calibrate import (
    StatisticsCursor,
    build_calibration_set,
    capture_statistics,
    layer_order,
    load_for_calibration,
)
from skillhub.pack.card import render_card
from skillhub.compress.delta import check_compatible, iter_deltas
from skillhub.errors import OperatorError, SkillhubError
from skillhub.pack.manifest import FORMAT_VERSION, TENSORS_FILE, check_pack_identity, totals
from skillhub.io.checkpoint import Checkpoint, Fingerprint, open_checkpoint
from skillhub.operators import EncodeContext, provenance
from skillhub.io.outputs import check_output, staged_directory
from skillhub.pack.format import PackWriter, SkillPack, load_pack
from skillhub.progress import ProgressCallback, no_progress, reporting
from skillhub.compress.recipe import ModulePlan, Recipe
from skillhub.io.tensorfile import dtype_name


def _parent_reference(parent: str | os.PathLike[str] | None) -> dict[str, str] | None:
    if parent is None:
        return None
    pack = load_pack(parent)
    return {"name": pack.name, "version": pack.version, "sha256": pack.manifest["files"][TENSORS_FILE]["sha256"]}


def _plan_every_parameter(recipe: Recipe, checkpoint: Checkpoint) -> dict[str, ModulePlan]:
    return {n: recipe.plan(n, model_type=checkpoint.model_type, ndim=len(checkpoint.shape(n))) for n in checkpoint.names()}


def _tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as exc:
        raise SkillhubError(f"{checkpoint.path} has no usable tokenizer for the calibration text: {exc}") from exc


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
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
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
        device: Where the compression maths runs (``cpu``, ``cuda``...).
        seed: Seed of randomized operators.
        force: Replace ``output`` if it exists.
        progress: Called as ``progress("compress", done, total)``.

    Returns:
        The written pack, opened.

    Raises:
        SkillhubError: Any problem with the inputs; nothing is written then.
    """
    output = Path(output)
    if ratio is not None:
        check_ratio(ratio)
    plan_recipe = Recipe(recipe)
    base_ckpt = _checkpoint(base, base_revision)
    tuned_ckpt = _checkpoint(tuned, tuned_revision)
    check_compatible(base_ckpt, tuned_ckpt)
    inputs = [base_ckpt.path, tuned_ckpt.path, parent, calib,
              recipe if isinstance(recipe, (str, os.PathLike)) and recipe != "paper" else None]
    check_output(output, force=force, protect=inputs)
    name = name or output.name
    task = task or name
    check_pack_identity(name=name, task=task, version=version)
    plans = _plan_every_parameter(plan_recipe, base_ckpt)
    parent_ref = _parent_reference(parent)
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise SkillhubError(f"device {device!r} is not usable here: {exc}") from exc
    calibration = model = None
    if calib is not None:
        calibration = build_calibration_set(calib, _tokenizer(tuned_ckpt), samples=calib_samples, seqlen=calib_seqlen)
        quantizer = {"method": "gptq", "calibration": calibration.source}
        model = load_for_calibration(tuned_ckpt.path, device=device)
    else:
        quantizer = {"method": "rtn", "note": "no calibration data: factors quantized by round-to-nearest"}

    def statistics() -> StatisticsCursor | None:
        return StatisticsCursor(capture_statistics(model, calibration)) if calibration is not None else None

    budget = None
    if ratio is not None:
        planning = iter_deltas(base_ckpt, tuned_ckpt, names=layer_order(list(plans)))
        chosen, budget = plan_budget(
            reporting(planning, progress, "plan", len(plans)),
            roles={n: p.role for n, p in plans.items()},
            numels={n: math.prod(base_ckpt.shape(n)) for n in plans},
            ratio=ratio, statistics=statistics(), device=torch_device, seed=seed,
        )
        description = f"chosen by budget mode for ratio {ratio} ({budget['weighting']} weighting)"
        plan_recipe = Recipe(budget_recipe(f"budget-{ratio:g}", chosen, description))
        plans = _plan_every_parameter(plan_recipe, base_ckpt)
    cursor = statistics()

    modules: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    fingerprint = Fingerprint()
    parameters = squared_error = squared_norm = 0.0
    with staged_directory(output, force=force, protect=inputs, kind="pack") as staging:
        writer = PackWriter(staging)
        deltas = iter_deltas(base_ckpt, tuned_ckpt, names=layer_order(list(plans)), fingerprint=fingerprint)
        for item in reporting(deltas, progress, "compress", len(plans)):
            parameters += item.delta.numel()
            if not torch.any(item.delta):
                unchanged.append(item.name)
            else:
                plan = plans[item.name]
                ctx = EncodeContext(name=item.name, role=plan.role, device=torch_device, seed=seed,
                                    calibration=cursor.get(item.name) if cursor else None)
                delta = item.delta.to(torch_device)
                try:
                    encoded = plan.operator.encode(delta, plan.params, ctx)
                    decoded = plan.operator.decode(
                        {k: v.cpu() for k, v in encoded.tensors.items()}, encoded.meta, plan.params, tuple(delta.shape),
                        version=plan.operator.version,
                    )
                except ValueError as exc:  # operators' documented way to refuse an input
                    raise OperatorError(f"operator {plan.operator.name} cannot encode {item.name}: {exc}") from exc
                error = float(torch.linalg.vector_norm(decoded - item.delta))
                norm = float(torch.linalg.vector_norm(item.delta))
                squared_error += error**2
                squared_norm += norm**2
                modules[item.name] = {
                    "role": plan.role,
                    "operator": plan.operator.name,
                    "operator_version": plan.operator.version,
                    "params": plan.params,
                    "meta": encoded.meta,
                    "shape": list(item.delta.shape),
                    "dtype": dtype_name(item.base_dtype),
                    "fields": list(encoded.tensors),
                    "stored_bytes": writer.add_module(item.name, encoded.tensors),
                    "delta_fp16_bytes": 2 * item.delta.numel(),
                    "error": error / norm,
                }
        manifest: dict[str, Any] = {
            "format": "skillpack",
            "format_version": FORMAT_VERSION,
            "name": name,
            "task": task,
            "version": version,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "skillhub_version": __version__,
            "parent": parent_ref,
            "base": {
                "id": base_ckpt.ref.id,
                "revision": base_ckpt.ref.revision,
                "architecture": base_ckpt.architecture,
                "model_type": base_ckpt.model_type,
                "fingerprint": fingerprint.hexdigest(),
                "dtype": base_ckpt.dominant_dtype(),
                "tie_word_embeddings": base_ckpt.tie_word_embeddings,
            },
            "tuned": {"id": tuned_ckpt.ref.id, "revision": tuned_ckpt.ref.revision},
            "recipe": plan_recipe.document,
            "operators": {p.operator.name: provenance(p.operator)
                          for p in sorted(plans.values(), key=lambda p: p.operator.name) if p.name in modules},
            "quantizer": quantizer,
            **({"budget": budget} if budget else {}),
            "modules": modules,
            "unchanged": unchanged,
            "totals": totals(
                modules,
                parameters=int(parameters),
                delta_fp16_bytes=2 * int(parameters),
                squared_error=squared_error,
                squared_norm=squared_norm,
            ),
        }
        writer.finish(manifest, render_card(manifest))
    return load_pack(output, verify=False)

