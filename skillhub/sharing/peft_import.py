"""A PEFT LoRA adapter as a SkillPack (``create --from-peft``, ``add --from-peft``), lossless.

Every LoRA module becomes a ``lowrank`` module holding the adapter's own ``lora_A`` and ``lora_B``
bit for bit, with the module's scaling (alpha / r, rsLoRA's alpha / sqrt(r), per-module patterns)
and, for embeddings and ``fan_in_fan_out`` layers, the transpose in its meta: the pack decodes to
exactly B @ A * scaling, what PEFT merges. A ``lora_B.bias`` (``lora_bias``) is stored as its scaled
float32 value, and a module in ``modules_to_save`` as the float32 difference of its saved weights
and the base's (``raw``). Only safetensors adapters are read: ``adapter_model.bin`` is a pickle.

Adapters skillhub cannot represent exactly are refused, naming what they use: other PEFT types
(LoHa, LoKr, IA3, ...), DoRA, layer replication, target parameters, trainable tokens, aLoRA.
The adapter must fit the base: every module it changes exists there with the same shape, and
the base it names (``base_model_name_or_path``) is the one given, unless told otherwise.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import asdict, dataclass
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from skillhub import __version__
from skillhub.compress.roles import role_of
from skillhub.errors import MismatchError, SkillhubError
from skillhub.compress.options import CompressionOptions
from skillhub.io.checkpoint import Checkpoint, CheckpointRef, PatchedCheckpoint, open_checkpoint
from skillhub.io.jsonio import read_json
from skillhub.io.outputs import check_output, staged_directory
from skillhub.io.tensorfile import TensorFile, dtype_name
from skillhub.operators.discovery import get_operator, provenance
from skillhub.pack.card import render_card
from skillhub.pack.format import PackWriter, SkillPack, load_pack
from skillhub.pack.manifest import FORMAT_VERSION, BaseRef, check_pack_identity, totals
from skillhub.progress import ProgressCallback, no_progress
from skillhub.sharing.peft_format import (CONFIG_FILE, PICKLED_WEIGHTS_FILE, PREFIX, WEIGHTS_FILE, module_scaling,
                                          split_key)

# Config keys that change what a LoRA computes beyond B @ A * scaling: refused when set.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "layer_replication": "layer replication",
    "target_parameters": "LoRA on target parameters", "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA (activated LoRA)", "use_qalora": "QA-LoRA", "arrow_config": "Arrow routing",
}


@dataclass(frozen=True)
class PeftSource:
    """An adapter to make a pack from, and how (``add --from-peft``)."""

    adapter: str
    revision: str | None = None
    ignore_base_name: bool = False
    compress: bool = False  # with the recipe options, instead of keeping the factors exactly


def read_adapter(adapter: str | os.PathLike[str], *, revision: str | None = None) -> tuple[dict[str, Any], Path, str]:
    """The adapter's config, its weights file and where it came from (a directory or a Hub id at a commit).

    Raises:
        SkillhubError: Not a PEFT LoRA adapter skillhub can represent exactly (naming why).
    """
    path = Path(adapter)
    if path.is_dir():
        where, source = path, str(path.resolve())
    else:
        text = str(adapter)
        if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise SkillhubError(f"{text} is neither an adapter directory nor a Hub id (OWNER/NAME)")
        from skillhub.io import hub

        where, commit = hub.download_snapshot(text, revision=revision, patterns=[CONFIG_FILE, WEIGHTS_FILE])
        source = f"{text}@{commit}"
    if not (where / CONFIG_FILE).is_file():
        raise SkillhubError(f"{adapter} has no {CONFIG_FILE}: it is not a PEFT adapter")
    config = read_json(where / CONFIG_FILE, what="PEFT adapter config", expect=dict)
    if not isinstance(config, dict):
        raise SkillhubError(f"{adapter}/{CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise SkillhubError(f"{adapter} is a PEFT {kind} adapter; skillhub imports LoRA adapters only "
                            "(their delta is B @ A * scaling)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise SkillhubError(f"{adapter} uses {what} ({key}), which a SkillPack cannot represent exactly; "
                                "merge it with PEFT and `skillhub create` from the merged model instead")
    if not (where / WEIGHTS_FILE).is_file():
        hint = (f" (only {PICKLED_WEIGHTS_FILE}, a pickle skillhub never loads: save it again with "
                "safe_serialization=True)") if (where / PICKLED_WEIGHTS_FILE).exists() else ""
        raise SkillhubError(f"{adapter} has no {WEIGHTS_FILE}{hint}")
    return config, where / WEIGHTS_FILE, source


def check_base_name(config: dict[str, Any], base: Checkpoint) -> None:
    """The adapter names the base it was trained on; refuse another one (by its last path part)."""
    named = config.get("base_model_name_or_path")
    if not named:
        return
    tail = lambda text: re.split(r"[/\\]", str(text).rstrip("/\\"))[-1].lower()  # noqa: E731
    if tail(named) not in (tail(base.ref.id), tail(base.path)):
        raise MismatchError(f"the adapter was trained on {named}, not on {base.ref.id}; pass that base "
                            "(or --ignore-base-name if these are the same weights under another name)")


def _modules(tensors: TensorFile) -> tuple[dict[str, dict[str, str]], list[str]]:
    """LoRA keys grouped by module ({module: {kind: key}}), and the full parameters (modules_to_save)."""
    lora: dict[str, dict[str, str]] = {}
    full = []
    for key in tensors.keys():
        if not key.startswith(PREFIX):
            raise SkillhubError(f"adapter key {key!r} does not start with {PREFIX!r}: not a PEFT adapter's weights")
        split = split_key(key)
        if split is None:
            full.append(key)
        else:
            lora.setdefault(split[0], {})[split[1]] = key
    return lora, full


def _lora_module(module: str, keys: dict[str, str], tensors: TensorFile, config: dict[str, Any],
                 base: Checkpoint) -> list[tuple[str, _Stored]]:
    """The pack modules of one LoRA module (its weight, and its bias with lora_bias), checked
    against the base from the adapter's header; the tensors are read when written."""
    embedding = "embedding_A" in keys
    a_key, b_key = (keys.get("embedding_A"), keys.get("embedding_B")) if embedding else (keys.get("A"), keys.get("B"))
    if a_key is None or b_key is None:
        raise SkillhubError(f"adapter module {module} lacks its A or B factor")
    parameter = f"{module}.weight"
    if parameter not in base:
        raise MismatchError(f"the adapter changes {module}, which base {base.ref.id} does not have: "
                            "it was made for another model")
    shape = tuple(base.shape(parameter))
    a_shape, b_shape = tensors.shape(a_key), tensors.shape(b_key)
    transposed = embedding or bool(config.get("fan_in_fan_out"))
    expected = (shape[1], shape[0]) if transposed and len(shape) == 2 else (shape[0], math.prod(shape[1:]))
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0] or (b_shape[0], a_shape[1]) != expected:
        raise MismatchError(f"adapter module {module} makes a {[b_shape[0], a_shape[-1]]} delta; base {base.ref.id} "
                            f"holds {parameter} as {list(shape)}: the adapter was made for another model")
    dtype = tensors.dtype(a_key)
    if tensors.dtype(b_key) != dtype or not dtype.is_floating_point:
        raise SkillhubError(f"adapter module {module} has factors of dtypes {dtype} and {tensors.dtype(b_key)}")
    rank = a_shape[0]
    scaling = module_scaling(config, module, rank)
    meta = {"rank": rank, "scaling": scaling, **({"transposed": True} if transposed else {})}
    found = [(parameter, _Stored("lowrank", lambda: {"A": tensors.read(a_key), "B": tensors.read(b_key)},
                                 {"rank": rank, "dtype": dtype_name(dtype)}, meta, shape))]
    if "bias" in keys:
        bias = f"{module}.bias"
        if bias not in base:
            raise MismatchError(f"the adapter has a LoRA bias for {module}, which has no bias in the base")
        found.append((bias, _Stored("raw", lambda: {"values": tensors.read(keys["bias"]).to(torch.float32) * scaling},
                                    {"dtype": "float32"}, {}, tuple(base.shape(bias)))))
    return found


def import_peft(adapter: str | os.PathLike[str], base: str | os.PathLike[str] | Checkpoint,
                output: str | os.PathLike[str], *, task: str | None = None, name: str | None = None,
                version: str = "1.0.0", adapter_revision: str | None = None, base_revision: str | None = None,
                ignore_base_name: bool = False, compression: CompressionOptions | None = None, force: bool = False,
                progress: ProgressCallback = no_progress) -> SkillPack:
    """Make a SkillPack at ``output`` from a LoRA adapter (see the module docstring).

    Args:
        adapter: An adapter directory or a Hub id.
        base: The base model the adapter was trained on (directory, Hub id or checkpoint); read
            once in full for its fingerprint.
        output: The pack directory to create.
        task, name, version: As :func:`skillhub.create_pack`.
        adapter_revision, base_revision: Hub revisions.
        ignore_base_name: Accept a base whose name differs from the adapter's ``base_model_name_or_path``.
        compression: Compress the adapter's delta with these options (recipe, budget, calibration),
            as :func:`~skillhub.compress.pipeline.create_pack` compresses a fine-tune; None keeps the
            factors exactly.
        force: Replace an earlier pack at ``output``.
        progress: Called as ``progress("import", done, total)`` (``"compress"`` when compressing).

    Raises:
        SkillhubError: The adapter cannot be represented exactly; MismatchError: it is for another base.
    """
    output = Path(output)
    name = name or output.name
    task = task or name
    check_pack_identity(name=name, task=task, version=version)
    config, weights, source = read_adapter(adapter, revision=adapter_revision)
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base, revision=base_revision)
    if not ignore_base_name:
        check_base_name(config, checkpoint)
    protect = [checkpoint.path, Path(adapter) if Path(adapter).exists() else None]
    check_output(output, force=force, protect=protect)  # before the base is read in full
    modules = _stored_modules(TensorFile(weights), config, checkpoint)
    if not modules:
        raise SkillhubError(f"adapter {adapter} changes nothing: it has no LoRA factors and no saved modules")
    if compression is not None:
        from skillhub.compress.pipeline import create_pack

        patched = PatchedCheckpoint(checkpoint, {p: functools.partial(_decode, m) for p, m in modules.items()},
                                    ref=CheckpointRef(id=source, revision=None, source="peft"))
        return create_pack(checkpoint, patched, output, task=task, name=name, version=version, force=force,
                           progress=progress, **compression.as_kwargs())
    base_ref = BaseRef.of(checkpoint)
    with staged_directory(output, force=force, protect=protect, kind="pack") as staging:
        writer = PackWriter(staging)
        entries = {}
        for done, parameter in enumerate(sorted(modules), 1):
            entry = _entry(writer, parameter, modules[parameter], checkpoint)
            if entry is not None:
                entries[parameter] = entry
            progress("import", done, len(modules))
        if not entries:
            raise SkillhubError(f"adapter {adapter} changes nothing: its factors and saved modules leave the base as it is")
        manifest = _manifest(name, task, version, base_ref, checkpoint, source, config, entries)
        writer.finish(manifest, render_card(manifest))
    return load_pack(output, verify=False)


@dataclass(frozen=True)
class _Stored:
    """One parameter's delta as the pack will store it: an operator's fields (read when called),
    params and meta."""

    operator: str
    load: Callable[[], dict[str, torch.Tensor]]
    params: dict[str, Any]
    meta: dict[str, Any]
    shape: tuple[int, ...]


def _decode(stored: _Stored) -> torch.Tensor:
    operator = get_operator(stored.operator)
    return operator.decode(stored.load(), stored.meta, stored.params, stored.shape, version=operator.version)


def _stored_modules(tensors: TensorFile, config: dict[str, Any], base: Checkpoint) -> dict[str, _Stored]:
    """Every parameter the adapter may change, checked against the base from the headers."""
    lora, full = _modules(tensors)
    modules: dict[str, _Stored] = {}
    for module, keys in lora.items():
        modules.update(_lora_module(module, keys, tensors, config, base))
    for key in full:
        # PEFT also saves a targeted embedding's own weight, as <module>.base_layer.weight.
        parameter = key[len(PREFIX):].replace(".base_layer.", ".")
        if parameter not in base or tuple(base.shape(parameter)) != tuple(tensors.shape(key)):
            raise MismatchError(f"the adapter saves {parameter} (modules_to_save), which base {base.ref.id} "
                                "does not hold in that shape: it was made for another model")
        if ".base_layer." in key:  # the weights the LoRA was trained on: they must be the base's
            if not torch.equal(tensors.read(key).to(base.dtype(parameter)), base.read(parameter)):
                raise MismatchError(f"the adapter's saved base layer of {parameter} differs from base {base.ref.id}: "
                                    "it was trained on other weights")
            continue
        difference = functools.partial(_saved_difference, tensors, key, base, parameter)
        modules[parameter] = _Stored("raw", difference, {"dtype": "float32"}, {}, tuple(base.shape(parameter)))
    return modules


def _saved_difference(tensors: TensorFile, key: str, base: Checkpoint, parameter: str) -> dict[str, torch.Tensor]:
    """A saved module's parameter minus the base's, in float32 (exact for the stored dtypes)."""
    return {"values": tensors.read(key).to(torch.float32) - base.read(parameter).to(torch.float32)}


def _entry(writer: PackWriter, parameter: str, stored: _Stored, base: Checkpoint) -> dict[str, Any] | None:
    """Write one module and make its manifest entry (None: the adapter leaves it unchanged)."""
    tensors = stored.load()
    if stored.operator == "raw" and not torch.any(tensors["values"]):
        return None  # a saved module equal to the base's
    operator = get_operator(stored.operator)
    return {
        "role": role_of(parameter, model_type=base.model_type, ndim=len(stored.shape)), "operator": operator.name,
        "operator_version": operator.version, "params": stored.params, "meta": stored.meta,
        "shape": list(stored.shape), "dtype": dtype_name(base.dtype(parameter)), "fields": list(tensors),
        "stored_bytes": writer.add_module(parameter, tensors), "delta_fp16_bytes": 2 * math.prod(stored.shape),
        "error": 0.0,
    }


def _manifest(name: str, task: str, version: str, base_ref: BaseRef, base: Checkpoint, source: str,
              config: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    parameters = sum(math.prod(base.shape(n)) for n in base.names())
    lora_modules = "|".join(re.escape(n) for n, e in entries.items() if e["operator"] == "lowrank")
    recipe = {
        "name": "peft-lora-import",
        "description": f"Imported from the PEFT LoRA adapter {source} (r={config.get('r')}, "
                       f"lora_alpha={config.get('lora_alpha')}, rslora={bool(config.get('use_rslora'))}): "
                       "factors kept as they are, other changed tensors as float32 differences.",
        "rules": [*([{"match": {"pattern": f"^({lora_modules})$"}, "operator": "lowrank"}] if lora_modules else []),
                  {"match": {"pattern": "."}, "operator": "raw", "params": {"dtype": "float32"}}],
    }
    used = sorted({e["operator"] for e in entries.values()})
    return {
        "format": "skillpack", "format_version": FORMAT_VERSION, "name": name, "task": task, "version": version,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "skillhub_version": __version__,
        "parent": None,
        "base": asdict(base_ref),
        "tuned": {"id": source, "revision": None},
        "recipe": recipe,
        "operators": {op: provenance(get_operator(op)) for op in used},
        "quantizer": {"method": "rtn", "note": "imported from a PEFT LoRA adapter: nothing was quantized"},
        "modules": entries,
        "unchanged": sorted(set(base.names()) - set(entries)),
        "totals": totals(entries, parameters=parameters, delta_fp16_bytes=2 * parameters, squared_error=0.0,
                         squared_norm=0.0),
    }
