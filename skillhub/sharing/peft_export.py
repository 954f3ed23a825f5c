"""A SkillPack as a PEFT LoRA adapter, for PEFT, ``transformers`` and vLLM (``skillhub export --format peft``).

Each module of the pack goes where a LoRA adapter can hold it:

- a matrix of an attention or MLP layer becomes ``lora_A``/``lora_B``. A low-rank operator's
  factors (svd-mixed's dequantized rank groups, lowrank, svd) give the exact SVD of the pack's
  delta through two thin QRs and the SVD of an r x r core, and sqrt(Sigma) goes to each side.
  A delta stored densely (rtn, raw, a plugin) is factorized exactly (rank min(m, n), said to be
  larger than the dense delta) or, under ``max_rank``, by its truncated SVD;
- embeddings and the output head (pruned, not low-rank) go to ``modules_to_save`` as full
  weights (base + delta), or, with ``embedding_rank``, become a LoRA of that rank;
- norms, other vectors and tensors of more than two dimensions put their module in
  ``modules_to_save``; a Linear's bias delta, when its weight is a LoRA target, is ``lora_B.bias``.

Every module gets alpha = r (``rank_pattern``/``alpha_pattern``), so the scaling is 1 in every
consumer, whichever of r or alpha it reads. ``for_vllm`` keeps to what vLLM loads: attention and
MLP matrices only, rank at most 512 by default, no ``modules_to_save``, no bias; each module that
is dropped or truncated is reported with the share of its delta's energy lost. The export's
logits are then measured against the pack's on the base model (``check``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from skillhub.errors import MismatchError, SkillhubError
from skillhub.io.checkpoint import Checkpoint, fingerprint, open_checkpoint
from skillhub.io.jsonio import write_atomically
from skillhub.io.outputs import check_output, staged_directory
from skillhub.io.tensorfile import TensorFileWriter, dtype_from_name
from skillhub.numerics.svd import truncated_svd
from skillhub.pack.format import SkillPack, load_pack
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.results import Result
from skillhub.sharing.peft_format import PREFIX, WEIGHTS_FILE

if TYPE_CHECKING:
    from skillhub.registry.front import Registry

_log = logging.getLogger(__name__)

VLLM_MAX_RANK = 512  # the largest max_lora_rank vLLM accepts
LORA_ROLES = ("attention", "mlp")  # matrices every LoRA consumer (vLLM included) targets
CHECK_SEQUENCES, CHECK_TOKENS = 4, 32  # the logit check's random token windows
TIED_HEAD = "lm_head"  # the output head a tied embedding stands for (the logit check catches another name)


@dataclass(frozen=True)
class ExportedModule(Result):
    """Where one parameter of the pack went in the adapter."""

    parameter: str
    role: str
    action: str  # lora | lora-bias | modules_to_save | dropped
    rank: int | None
    energy_lost: float  # share of the delta's squared norm the export does not carry
    note: str = ""


@dataclass(frozen=True)
class LogitCheck(Result):
    """The export's logits against the pack's, on random token windows of the base model."""

    max_abs_error: float
    relative_error: float  # ||logits(export) - logits(pack)|| / ||logits(pack) - logits(base)||
    tokens: int


@dataclass(frozen=True)
class PeftExport(Result):
    """What ``export --format peft`` wrote."""

    path: Path
    rank: int
    target_modules: int
    modules_to_save: tuple[str, ...]
    adapter_bytes: int
    pack_bytes: int
    dense_delta_fp16_bytes: int
    for_vllm: bool
    modules: tuple[ExportedModule, ...]
    check: LogitCheck | None
    seconds: float
    warnings: tuple[str, ...] = field(default=())


@dataclass
class _Plan:
    """Where each parameter goes, decided from the manifest alone (nothing decoded yet)."""

    lora: dict[str, tuple[str, int | None, bool]] = field(default_factory=dict)  # module: parameter, cap, embedding
    biases: dict[str, str] = field(default_factory=dict)  # module: its bias parameter (lora_B.bias)
    saved_modules: set[str] = field(default_factory=set)
    report: dict[str, ExportedModule] = field(default_factory=dict)  # by parameter
    warnings: list[str] = field(default_factory=list)


def _owner(parameter: str) -> tuple[str, str]:
    module, _, leaf = parameter.rpartition(".")
    return module, leaf


def _balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank-one term's scale split evenly between its two factors
    (sqrt(Sigma) on each side for SVD factors), so neither overflows a half-precision dtype."""
    scale = (a.norm(dim=1) / b.norm(dim=0)).sqrt()
    kept = torch.isfinite(scale) & (scale > 0)  # a term with a zero factor adds nothing
    return b[:, kept] * scale[kept], a[kept] / scale[kept, None]


def _truncated(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of B @ A and the share of its squared norm left out: the
    exact SVD of B @ A from the thin QRs of B and A^T (float32) and the SVD of the r x r core (float64)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b.double() @ r_a.T.double())
    total = float((s ** 2).sum())
    lost = float((s[rank:] ** 2).sum()) / total if total else 0.0
    root = s[:rank].sqrt().float()
    return (q_b @ u[:, :rank].float()) * root, root[:, None] * (vh[:rank].float() @ q_a.T), lost


def _factorize(pack: SkillPack, parameter: str, cap: int | None) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """LoRA factors (B, A) of a module's delta as a matrix, at most ``cap`` wide, and the energy lost."""
    stored = pack.factors(parameter)
    if stored is not None:
        b, a = stored
        if cap is None or cap >= b.shape[1]:
            return (*_balanced(b, a), 0.0, "")
        return (*_truncated(b, a, cap), "")
    entry = pack.modules[parameter]
    delta = pack.decode(parameter).reshape(entry.shape[0], -1)
    rows, cols = delta.shape
    if cap is None or cap >= min(rows, cols):  # exact: the delta itself on one side, the identity on the other
        note = f"stored densely by {entry.operator}: exported at full rank"
        if cols <= rows:
            return delta, torch.eye(cols), 0.0, note
        return torch.eye(rows), delta, 0.0, note
    u, s, vh = truncated_svd(delta, cap)
    total = float(delta.double().pow(2).sum())
    lost = max(0.0, 1.0 - float(s.double().pow(2).sum()) / total) if total else 0.0
    root = s.sqrt()
    return u * root, root[:, None] * vh, lost, f"stored densely by {entry.operator}: truncated SVD"


def _plan(pack: SkillPack, *, max_rank: int | None, embedding_rank: int | None, for_vllm: bool) -> _Plan:
    plan = _Plan()
    modules = pack.modules
    for name, entry in sorted(modules.items()):
        module, leaf = _owner(name)
        lora_role = entry.role in LORA_ROLES or (entry.role in ("embedding", "head") and embedding_rank and not for_vllm)
        if leaf == "weight" and len(entry.shape) == 2 and entry.split is None and lora_role:
            cap = embedding_rank if entry.role in ("embedding", "head") else max_rank
            plan.lora[module] = (name, cap, entry.role == "embedding")
    for name, entry in sorted(modules.items()):
        module, leaf = _owner(name)
        if module in plan.lora and leaf == "weight":
            continue  # reported when it is factorized
        if for_vllm:
            reason = ("vLLM loads LoRA on attention and MLP matrices only" if leaf == "weight"
                      else "vLLM loads no LoRA bias or modules_to_save")
            plan.report[name] = ExportedModule(name, entry.role, "dropped", None, 1.0, reason)
        elif leaf == "bias" and module in plan.lora and not plan.lora[module][2]:
            plan.biases[module] = name
            plan.report[name] = ExportedModule(name, entry.role, "lora-bias", None, 0.0)
        else:
            plan.saved_modules.add(module)
            plan.report[name] = ExportedModule(name, entry.role, "modules_to_save", None, 0.0,
                                               "full weights: base + delta")
    clash = plan.saved_modules & set(plan.lora)
    if clash:
        raise SkillhubError(f"module {sorted(clash)[0]} would be both a LoRA target and in modules_to_save "
                            "(PEFT has no LoRA bias for an embedding): export it without --embedding-rank")
    return plan


def _check_base(pack: SkillPack, base: Checkpoint) -> None:
    """The base checkpoint is the one the pack was made for (shapes first, then every byte)."""
    for name, entry in pack.modules.items():
        if name not in base or tuple(base.shape(name)) != entry.shape:
            raise MismatchError(f"{base.ref.id} is not the base of pack {pack.name!r}: {name} is missing or "
                                "of another shape; pass the pack's base with --base")
    if fingerprint(base) != pack.base_fingerprint:
        raise MismatchError(f"{base.ref.id} is not the base of pack {pack.name!r}: its weights differ "
                            f"({pack.manifest.base.id} was recorded); pass the pack's base with --base")


def _write_adapter(plan: _Plan, pack: SkillPack, base: Checkpoint | None, directory: Path, dtype: torch.dtype,
                   base_id: str, progress: ProgressCallback) -> int:
    """adapter_model.safetensors, one module at a time (factorized, written, dropped), then
    adapter_config.json through PEFT's own LoraConfig."""
    from peft import LoraConfig

    writer = TensorFileWriter(directory / WEIGHTS_FILE)
    tied = bool(pack.manifest.base.tie_word_embeddings)
    ranks = {}
    total, done = len(plan.lora) + len(plan.saved_modules), 0
    for module, (name, cap, embedding) in sorted(plan.lora.items()):
        b, a, lost, note = _factorize(pack, name, cap)
        rows, rank, cols = b.shape[0], b.shape[1], a.shape[1]
        if rank * (rows + cols) > rows * cols:
            note = (f"{note}; " if note else "") + (f"rank {rank} is above {rows * cols / (rows + cols):.0f} "
                                                     "= m*n/(m+n): this LoRA is larger than the dense delta")
            plan.warnings.append(f"{name}: {note}")
        plan.report[name] = ExportedModule(name, pack.modules[name].role, "lora", rank, lost, note)
        ranks[module] = rank
        if embedding:  # PEFT's embedding LoRA: delta^T = lora_embedding_B @ lora_embedding_A
            writer.add(f"{PREFIX}{module}.lora_embedding_A", b.T.to(dtype))
            writer.add(f"{PREFIX}{module}.lora_embedding_B", a.T.to(dtype))
        else:
            writer.add(f"{PREFIX}{module}.lora_A.weight", a.to(dtype))
            writer.add(f"{PREFIX}{module}.lora_B.weight", b.to(dtype))
            if plan.biases:  # lora_bias is one setting: every target has a bias, zero where unchanged
                bias = pack.decode(plan.biases[module]) if module in plan.biases else torch.zeros(rows)
                writer.add(f"{PREFIX}{module}.lora_B.bias", bias.to(dtype))
        done += 1
        progress("export", done, total)
    for module in sorted(plan.saved_modules):
        for name in (n for n in base.names() if _owner(n)[0] == module):
            weight = base.read(name)
            if name in pack.modules:
                weight = (weight.to(torch.float32) + pack.decode(name)).to(weight.dtype)
            writer.add(f"{PREFIX}{name}", weight)
            if tied and name in pack.modules and pack.modules[name].role == "embedding":
                # PEFT ties the head's copy to it (ensure_weight_tying) and loads it from its own key.
                writer.add(f"{PREFIX}{TIED_HEAD}.weight", weight)
        done += 1
        progress("export", done, total)
    writer.finish({"format": "pt"})
    rank = max(ranks.values(), default=1)
    different = {module: r for module, r in ranks.items() if r != rank}
    LoraConfig(
        r=rank, lora_alpha=rank, rank_pattern=different, alpha_pattern=dict(different),
        target_modules=sorted(plan.lora) or None, modules_to_save=sorted(plan.saved_modules) or None,
        lora_bias=bool(plan.biases), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_id, revision=pack.manifest.base.revision, inference_mode=True,
        # A tied head must follow the exported embedding, as it follows the pack's embedding delta.
        ensure_weight_tying=tied,
    ).save_pretrained(str(directory))
    return writer.data_bytes


def _measure(pack: SkillPack, base: Checkpoint, adapter: Path) -> LogitCheck:
    """Logits of the base with the pack patched in, and with the adapter loaded by PEFT, both in
    float32: in the base's bfloat16 the patched reference itself rounds W + delta (about 2% of a
    small delta), which would hide the export's own error."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from skillhub.activation import patched
    from skillhub.progress import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (CHECK_SEQUENCES, CHECK_TOKENS), generator=generator)
    with torch.no_grad():
        plain = model(ids).logits.float()
        with patched(model, [pack]):
            expected = model(ids).logits.float()
        with quiet_transformers():
            exported = PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits.float()
    effect = float((expected - plain).norm())
    error = exported - expected
    return LogitCheck(max_abs_error=float(error.abs().max()), relative_error=float(error.norm()) / effect if effect else 0.0,
                      tokens=ids.numel())


def _card(pack: SkillPack, result: dict[str, Any], base_id: str) -> str:
    tags = ["skillhub", "peft", "lora", f"task:{pack.task}", *(["vllm"] if result["for_vllm"] else [])]
    dropped = [m for m in result["modules"] if m.action == "dropped"]
    truncated = [m for m in result["modules"] if m.action == "lora" and m.energy_lost > 0]
    lines = [
        "---", "library_name: peft", f"base_model: {json.dumps(base_id)}", "base_model_relation: adapter", "tags:",
        *(f"- {json.dumps(t)}" for t in tags), "---", "",
        f"# LoRA adapter exported from SkillPack `{pack.name}` {pack.version}", "",
        f"The SkillPack teaches **{base_id}** the task **{pack.task}**; this is it as a PEFT LoRA adapter "
        "(alpha = r for every module, so the scaling is 1), written by `skillhub export --format peft`"
        + (" --for vllm" if result["for_vllm"] else "") + ".", "",
        f"- rank {result['rank']} ({result['target_modules']} target modules), modules_to_save: "
        f"{', '.join(result['modules_to_save']) or 'none'}",
        f"- adapter {result['adapter_bytes']:,} bytes; pack {result['pack_bytes']:,}; dense fp16 delta "
        f"{result['dense_delta_fp16_bytes']:,}",
        f"- dropped: {len(dropped)} parameter(s); truncated: {len(truncated)}",
    ]
    check = result["check"]
    if check is not None:
        lines.append(f"- logits vs the pack on {check.tokens} random tokens: max |error| {check.max_abs_error:.3g}, "
                     f"relative to the pack's effect {check.relative_error:.3g}")
    lines += ["", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base_id)}), "
              "\"path/to/this/adapter\")", "```", ""]
    if result["for_vllm"]:
        lines += ["```bash", f"vllm serve {base_id} --enable-lora --max-lora-rank {max(16, result['rank'])} "
                  f"--lora-modules {pack.task}=path/to/this/adapter", "```", ""]
    return "\n".join(lines)


def _open(pack: str | os.PathLike[str] | SkillPack, registry: Registry | None) -> tuple[SkillPack, str | None]:
    """The pack (a directory, or a registry pack id) and, from the registry, where its base is."""
    if isinstance(pack, SkillPack):
        return pack, None
    if Path(pack).is_dir():
        return load_pack(pack), None
    if registry is None:
        raise SkillhubError(f"{pack} is neither a pack directory nor a pack id (no registry given)")
    base_entry, opened = registry.activation_set(packs=[str(pack)])
    return opened[0], base_entry.location


def export_peft(pack: str | os.PathLike[str] | SkillPack, output: str | os.PathLike[str], *,
                registry: Registry | None = None,
                base: str | os.PathLike[str] | Checkpoint | None = None, base_revision: str | None = None,
                max_rank: int | None = None, embedding_rank: int | None = None, for_vllm: bool = False,
                dtype: str | None = None, check: bool = True, force: bool = False,
                progress: ProgressCallback = no_progress) -> PeftExport:
    """Write ``pack`` as a PEFT LoRA adapter directory (see the module docstring).

    Args:
        pack: A pack directory, an opened pack, or the id of an active pack of ``registry``.
        output: The adapter directory to create.
        registry: Where to look up a pack id (and its base's location).
        base: The pack's base model (directory, Hub id or checkpoint; default: the registered base of
            a pack id): needed for modules_to_save (full weights) and for the logit check; its weights
            are checked against the pack's fingerprint.
        base_revision: With a Hub id: branch, tag or commit.
        max_rank: Largest LoRA rank of attention and MLP modules (default: exact; 512 with ``for_vllm``).
        embedding_rank: Export embedding and head deltas as LoRA of this rank instead of modules_to_save.
        for_vllm: Keep to what vLLM loads; report what was dropped or truncated.
        dtype: Of the LoRA factors (default: the base model's dtype).
        check: Measure the export's logits against the pack's (needs ``base``; loads the model).
        force: Replace an earlier export at ``output``.
        progress: Called as ``progress("export", done, total)``.

    Raises:
        SkillhubError: A bad option, or the base is needed and not given; nothing is written then.
        MismatchError: ``base`` is not the pack's base.
    """
    started = time.perf_counter()
    for option, value in (("--max-rank", max_rank), ("--embedding-rank", embedding_rank)):
        if value is not None and value < 1:
            raise SkillhubError(f"{option} must be at least 1, got {value}")
    if for_vllm and max_rank is None:
        max_rank = VLLM_MAX_RANK
    opened, registered_base = _open(pack, registry)
    base = base if base is not None else registered_base
    opened.require_operators()
    torch_dtype = dtype_from_name(dtype or opened.manifest.base.dtype)
    if not torch_dtype.is_floating_point:
        raise SkillhubError(f"--dtype must be a float dtype, got {dtype}")
    plan = _plan(opened, max_rank=max_rank, embedding_rank=embedding_rank, for_vllm=for_vllm)
    if (plan.saved_modules or check) and base is None:
        need = "modules_to_save (full weights)" if plan.saved_modules else "the logit check"
        raise SkillhubError(f"the export needs the pack's base model for {need}: pass --base BASE"
                            + ("" if plan.saved_modules else " (or --no-check)"))
    checkpoint = None
    if base is not None:
        checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base, revision=base_revision)
    protect = [opened.path, checkpoint.path if checkpoint else None]
    check_output(output, force=force, protect=protect)  # before the base is read in full
    if checkpoint is not None:
        _check_base(opened, checkpoint)
    base_id = checkpoint.ref.id if checkpoint is not None and checkpoint.ref.source == "hub" else opened.manifest.base.id
    with staged_directory(output, force=force, protect=protect, kind="peft-adapter") as staging:
        adapter_bytes = _write_adapter(plan, opened, checkpoint, staging, torch_dtype, base_id, progress)
        measured = _measure(opened, checkpoint, staging) if check else None
        result = {
            "path": Path(output), "rank": max((m.rank for m in plan.report.values() if m.rank), default=0),
            "target_modules": len(plan.lora), "modules_to_save": tuple(sorted(plan.saved_modules)),
            "adapter_bytes": adapter_bytes, "pack_bytes": opened.manifest.stored_bytes,
            "dense_delta_fp16_bytes": opened.manifest["totals"]["delta_fp16_bytes"], "for_vllm": for_vllm,
            "modules": tuple(plan.report[name] for name in sorted(plan.report)), "check": measured,
            "warnings": tuple(plan.warnings),
        }
        write_atomically(staging / "README.md", _card(opened, result, base_id))
    for warning in plan.warnings:
        _log.warning("%s", warning)
    return PeftExport(**result, seconds=time.perf_counter() - started)
