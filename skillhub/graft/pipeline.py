"""Knowledge grafting (paper §3.2) as resumable stages in a work directory.

::

    generate  the source samples responses      generations.jsonl   (held-out prompts left out)
    score     the scorer ranks them              scores.jsonl
    sft       the target learns the best ones    sft/          (a full checkpoint)
    pairs     preference pairs for DPO           pairs.jsonl
    dpo       DPO from the SFT model             dpo/          (a full checkpoint; none without pairs)
    pack      θ* − θ_target compressed           the output pack
    check     every model scored on the held-out prompts (and --eval): did the target learn?

Each stage writes its output under a temporary name and renames it when done, so a graft
killed at any point resumes from the last finished stage. The work directory records the
graft's settings in ``graft.json``; a rerun with other settings is refused rather than mixing
two grafts' data. Once the pack is written the two checkpoints are deleted, unless ``keep``;
the small files stay, so the data the pack was trained on can be inspected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from skillhub.compress.windows import fit_windows
from skillhub.compress.options import CompressionOptions
from skillhub.compress.pipeline import create_pack
from skillhub.errors import GraftError, SkillhubError
from skillhub.evaluation.forgetting import DEFAULT_MERGE, add_and_score
from skillhub.scoring.datasets import HELDOUT_EVERY, load_eval_set, load_prompts
from skillhub.graft.checks import Checker, GraftScores, split_heldout, verdict
from skillhub.graft.generation import GenerationSettings, generate_responses, load_tokenizer, open_model
from skillhub.graft.pairs import PAIR_STRATEGIES, paper_pairs, sft_examples, source_vs_target_pairs
from skillhub.graft.scorers import Scorer, load_scorer
from skillhub.graft.training import (DEFAULT_BETA, DPO_LOSSES, TrainingSettings, choose_preset, preference_optimize,
                                     require_trl, supervised_finetune)
from skillhub.io.checkpoint import Checkpoint
from skillhub.io.jsonio import read_json, read_json_lines, write_atomically, write_json_lines
from skillhub.io.outputs import check_output
from skillhub.pack.manifest import BaseRef
from skillhub.progress import ProgressCallback, no_progress
from skillhub.scoring.prompts import PromptFormat, Renderer

if TYPE_CHECKING:
    from skillhub.activation import Merge
    from skillhub.pack.format import SkillPack
    from skillhub.registry.front import Registry
    from skillhub.registry.results import Scored

STAGES = ("generate", "score", "sft", "pairs", "dpo", "pack")
WORK_MARKER = "graft.json"
WORK_FORMAT = "skillhub-graft"


@dataclass
class GraftResult:
    """What a graft did: the pack (None when stopped early), its data and the stages' wall times."""

    work_dir: Path
    output: Path | None = None
    pack: SkillPack | None = None
    ran: list[str] = field(default_factory=list)  # stages run by this call
    reused: list[str] = field(default_factory=list)  # stages found finished in the work directory
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage run
    prompts: int = 0
    responses: int = 0
    sft_examples: int = 0
    pairs: int = 0
    dpo_skipped: str | None = None  # why there was no DPO stage
    removed: list[str] = field(default_factory=list)  # intermediate checkpoints deleted at the end
    added: Scored | None = None  # the registry entry and scores, with add_to
    scores: GraftScores | None = None  # source / target before / after SFT / after DPO / pack
    warning: str | None = None  # the target learned nothing: what to change

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None, "work_dir": str(self.work_dir),
            "pack": {"name": self.pack.name, "task": self.pack.task, "ratio": self.pack.manifest.ratio,
                     "bytes": self.pack.manifest.stored_bytes} if self.pack else None,
            "ran": self.ran, "reused": self.reused, "seconds": self.seconds, "prompts": self.prompts,
            "responses": self.responses, "sft_examples": self.sft_examples, "pairs": self.pairs,
            "dpo_skipped": self.dpo_skipped, "removed": self.removed,
            "added": self.added.as_dict() if self.added else None,
            "scores": self.scores.as_dict() if self.scores else None, "warning": self.warning,
        }


def graft(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    prompts: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    task: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
    generation: GenerationSettings = GenerationSettings(),
    scorer: str = "exact",
    min_score: float | None = None,
    pairs: str = "paper",
    dpo_loss: str = "length-normalised",
    beta: float | None = None,
    sft: TrainingSettings = TrainingSettings(),
    dpo: TrainingSettings = TrainingSettings(),
    preset: str = "auto",
    compression: CompressionOptions = CompressionOptions(),
    keep: bool = False,
    stop_after: str | None = None,
    force: bool = False,
    add_to: Registry | None = None,
    eval_file: str | os.PathLike[str] | None = None,
    base: str | None = None,
    new_base: bool = False,
    merge: Merge | None = DEFAULT_MERGE,
    prompt_format: PromptFormat = PromptFormat(),
    progress: ProgressCallback = no_progress,
) -> GraftResult:
    """Graft what ``source`` does on ``prompts`` into ``target``, as a SkillPack at ``output``.

    Args:
        source, target: Local model directories or Hub ids (any architectures and tokenizers).
        prompts: JSONL of ``{"prompt"}``, with ``"answer"`` for the ``exact`` scorer.
        output: The pack directory to write.
        task: The pack's task (default: the output directory's name).
        work_dir: Where the stages keep their outputs (default: ``<output>.graft`` beside it).
        source_revision, target_revision: Hub revisions.
        generation: How the source samples.
        scorer: ``exact``, ``rule:MODULE:FUNCTION``, ``reward:MODEL`` or a plugin (see :mod:`skillhub.graft.scorers`).
        min_score: Fine-tune only on prompts whose best response scores at least this.
        pairs: ``paper``, ``source-vs-target`` or ``none`` (see :mod:`skillhub.graft.pairs`).
        dpo_loss: ``length-normalised`` (LN-DPO, the paper's for Llama) or ``sigmoid`` (DPO).
        beta: DPO's β (default: 10 for length-normalised, 0.1 for sigmoid).
        sft, dpo: The two training stages' settings (learning rate and epochs unset: the preset's).
        preset: ``paper`` (Table 13, for 7-8B targets), ``small`` (measured for targets under 1B
            parameters) or ``auto`` (by the target's parameter count); see ``training.PRESETS``.
        compression: How the pack is made; its calibration defaults to the generated responses,
            its seed also seeds sampling and training.
        keep: Keep the SFT and DPO checkpoints in the work directory.
        stop_after: Stop once this stage is finished (a later call resumes from there).
        force: Replace ``output`` if skillhub wrote it; with ``add_to``, add the pack even when the
            target learned nothing.
        add_to: Add the pack to this registry as ``task`` (checked before any work: its base
            must be the target), with ``eval_file`` as the task's eval set, then score every task.
        base, new_base: As :meth:`Registry.add`.
        merge: With ``add_to``: the merge of every active pack scored as a policy of its own (None: none).
        prompt_format: How the target reads the prompts (training, its answers, the task's scoring);
            the source always reads them in its own default format.
        progress: Called per stage as ``progress(stage, done, total)``.

    Raises:
        GraftError: Unusable prompts, source, scorer or work directory; nothing is written then.
        MismatchError: ``add_to`` holds another base than the target.
    """
    if pairs not in PAIR_STRATEGIES:
        raise GraftError(f"unknown pair strategy {pairs!r}: use one of {', '.join(PAIR_STRATEGIES)}")
    if dpo_loss not in DPO_LOSSES:
        raise GraftError(f"unknown DPO loss {dpo_loss!r}: use one of {', '.join(DPO_LOSSES)}")
    if stop_after is not None and stop_after not in STAGES:
        raise GraftError(f"unknown stage {stop_after!r}: use one of {', '.join(STAGES)}")
    require_trl()
    output = Path(output)
    task = task or output.name
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".graft")
    records = load_prompts(prompts, what="prompts file")
    chosen_scorer = load_scorer(scorer)
    _check_answers(chosen_scorer, records, prompts)
    source_checkpoint = open_model(source, revision=source_revision, role="source")
    target_checkpoint = open_model(target, revision=target_revision, role="target")
    load_tokenizer(source_checkpoint, role="source")  # a source that cannot produce text fails here
    target_tokenizer = load_tokenizer(target_checkpoint, role="target")
    try:
        Renderer(target_tokenizer, prompt_format, what=f"the target model {target_checkpoint.ref.id}")
    except SkillhubError as exc:
        raise GraftError(str(exc)) from exc
    eval_examples = load_eval_set(eval_file, "exact_match") if eval_file is not None else None
    if add_to is not None:
        add_to.db.require_writable()
        add_to.check_base(BaseRef.of(target_checkpoint), base=base, new_base=new_base)
    check_output(output, force=force, protect=[source_checkpoint.path, target_checkpoint.path, prompts, work])
    seed = compression.seed  # one seed for sampling, training and randomized SVD
    preset = choose_preset(preset, sum(math.prod(target_checkpoint.shape(n)) for n in target_checkpoint.names()))
    sft, dpo = sft.resolved(preset, "sft"), dpo.resolved(preset, "dpo")
    generation, sft, dpo = replace(generation, seed=seed), replace(sft, seed=seed), replace(dpo, seed=seed)
    beta = DEFAULT_BETA[dpo_loss] if beta is None else beta
    identity = {
        "source": _identity(source_checkpoint), "target": _identity(target_checkpoint),
        "prompts_sha256": _sha256(json.dumps(records, sort_keys=True)), "heldout_every": HELDOUT_EVERY,
        "generation": generation.as_dict(),
        "scorer": chosen_scorer.describe(), "min_score": min_score, "pairs": pairs, "sft": sft.as_dict(),
        "dpo": {**dpo.as_dict(), "loss": dpo_loss, "beta": beta} if pairs != "none" else None,
        **({"prompt_format": prompt_format.as_json()} if prompt_format != PromptFormat() else {}),
    }
    _open_work_dir(work, identity, protect=[source_checkpoint.path, target_checkpoint.path])

    run = _Run(work, GraftResult(work_dir=work, prompts=len(records)), stop_after)
    trained_on, heldout = split_heldout(records)
    prompt_texts = [r["prompt"] for r in trained_on]
    generations = run.jsonl_stage("generate", "generations.jsonl", lambda: [
        {**record, "responses": responses} for record, responses in
        zip(trained_on, generate_responses(source_checkpoint, prompt_texts, generation, device=_device(),
                                           progress=progress))])
    if generations is None:
        return run.result
    run.result.responses = sum(len(g["responses"]) for g in generations)
    scored = run.jsonl_stage("score", "scores.jsonl", lambda: _score(chosen_scorer, generations, progress))
    if scored is None:
        return run.result
    examples = sft_examples(scored, min_score=min_score)
    run.result.sft_examples = len(examples)
    sft_dir = run.model_stage("sft", "sft", lambda out: supervised_finetune(
        target_checkpoint.path, examples, out, sft, prompt_format=prompt_format, progress=progress))
    if sft_dir is None:
        return run.result
    preference = run.jsonl_stage("pairs", "pairs.jsonl", lambda: _pairs(
        pairs, scored, sft_dir, chosen_scorer, generation, prompt_format, progress))
    if preference is None:
        return run.result
    run.result.pairs = len(preference)
    if preference:
        tuned = run.model_stage("dpo", "dpo", lambda out: preference_optimize(
            sft_dir, preference, out, dpo, loss=dpo_loss, beta=beta, prompt_format=prompt_format, progress=progress))
        if tuned is None:
            return run.result
    else:
        tuned = sft_dir
        run.result.dpo_skipped = "--pairs none" if pairs == "none" else "no prompt gave a preference pair"

    if compression.calib is None:  # the generated data, with as many windows as it holds
        calib = write_json_lines(work / "calibration.jsonl",  # rendered as the target reads them
                                 [{"prompt": e["prompt"], "answer": e["completion"]} for e in examples])
        samples, seqlen = fit_windows(calib, target_tokenizer, samples=compression.calib_samples,
                                      seqlen=compression.calib_seqlen)
        compression = replace(compression, calib=calib, calib_samples=samples, calib_seqlen=seqlen)
    provenance = {
        "source": _reference(source_checkpoint), "target": _reference(target_checkpoint),
        "prompts_sha256": identity["prompts_sha256"],
        "data_sha256": _sha256(json.dumps({"sft": examples, "dpo": preference}, sort_keys=True)),
        "generation": identity["generation"], "scorer": identity["scorer"], "pairs": pairs,
        "sft": identity["sft"], "dpo": identity["dpo"] if preference else None,
    }
    started = time.perf_counter()
    run.result.pack = create_pack(target_checkpoint, tuned, output, task=task, force=force, provenance=provenance,
                                  progress=progress, **compression.as_kwargs())
    run.result.output = output
    run.finished("pack", started)
    started = time.perf_counter()
    checker = Checker(heldout, chosen_scorer, eval_examples, prompt_format, generation, device=_device(),
                      progress=progress)
    checker.score("source", source_checkpoint, own_format=True)
    checker.score("target_before", target_checkpoint)
    checker.score_dir("sft", work / "sft")
    checker.score_dir("dpo", work / "dpo" if preference else None)
    checker.score("pack", target_checkpoint, packs=[run.result.pack])
    run.result.scores, run.result.warning = checker.scores, verdict(checker.scores, sft_learning_rate=sft.learning_rate)
    run.finished("check", started)
    if not keep:
        run.result.removed = [str(p) for p in (work / "sft", work / "dpo") if p.is_dir()]
        for path in run.result.removed:
            shutil.rmtree(path)
    if add_to is not None and run.result.warning is not None and not force:
        raise GraftError(f"{run.result.warning}; the pack was written to {output} but not added to the registry "
                         "(--force adds it anyway)")
    if add_to is not None:
        run.result.added = add_and_score(add_to, run.result.pack, task=task, base=base, new_base=new_base,
                                         base_location=_identity(target_checkpoint)["id"], eval_file=eval_file,
                                         merge=merge, prompt_format=prompt_format, progress=progress)
    return run.result


class _Run:
    """Runs or reuses the stages of one graft, timing each and stopping after ``stop_after``."""

    def __init__(self, work: Path, result: GraftResult, stop_after: str | None) -> None:
        self.work, self.result, self.stop_after = work, result, stop_after

    def finished(self, stage: str, started: float) -> None:
        self.result.ran.append(stage)
        self.result.seconds[stage] = round(time.perf_counter() - started, 3)

    def _go_on(self, stage: str) -> bool:
        return stage != self.stop_after

    def jsonl_stage(self, stage: str, name: str, make) -> list[dict[str, Any]] | None:
        """The stage's records, read back if it finished before, else made and written."""
        path = self.work / name
        if path.is_file():
            records = read_json_lines(path, what=f"graft work file {path}")
            self.result.reused.append(stage)
        else:
            started = time.perf_counter()
            records = make()
            write_json_lines(path, records)
            self.finished(stage, started)
        return records if self._go_on(stage) else None

    def model_stage(self, stage: str, name: str, train) -> Path | None:
        """The stage's checkpoint directory, trained unless it finished before."""
        path = self.work / name
        if (path / "config.json").is_file():
            self.result.reused.append(stage)
        else:
            shutil.rmtree(path.with_name(name + ".partial"), ignore_errors=True)  # a killed save
            started = time.perf_counter()
            train(path)
            self.finished(stage, started)
        return path if self._go_on(stage) else None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _identity(checkpoint: Checkpoint) -> dict[str, Any]:
    """Which model a work directory was made with: its resolved path, or its Hub id and commit."""
    where = str(checkpoint.path.resolve()) if checkpoint.ref.source == "local" else checkpoint.ref.id
    return {"id": where, "revision": checkpoint.ref.revision}


def _reference(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"id": checkpoint.ref.id, "revision": checkpoint.ref.revision, "architecture": checkpoint.architecture}


def _check_answers(scorer: Scorer, records: list[dict[str, str]], prompts: str | os.PathLike[str]) -> None:
    if scorer.needs_answer:
        missing = sum(1 for r in records if "answer" not in r)
        if missing:
            raise GraftError(f"scorer {scorer.name} needs an \"answer\" on every line of {prompts}, and {missing} "
                             "lines have none: add answers, or use --scorer rule:... or reward:MODEL")


def _open_work_dir(work: Path, identity: dict[str, Any], *, protect: list[Path]) -> None:
    """Create the work directory, or check that it holds this very graft."""
    for path in protect:
        if work.resolve() == path.resolve():
            raise GraftError(f"work directory {work} is the model directory {path}: choose another --work-dir")
    marker = work / WORK_MARKER
    if marker.is_file():
        recorded = read_json(marker, what=f"graft work file {marker}", error=GraftError, expect=dict)
        settings = recorded.get("settings") if isinstance(recorded, dict) and recorded.get("format") == WORK_FORMAT \
            else None
        if settings != identity:
            differing = sorted(k for k in identity if not isinstance(settings, dict) or settings.get(k) != identity[k])
            raise GraftError(f"work directory {work} holds another graft (it differs in {', '.join(differing)}): "
                             "use another --work-dir, or delete that one to start over")
        return
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise GraftError(f"work directory {work} exists and is not a graft's (no {WORK_MARKER}): "
                         "choose another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps({"format": WORK_FORMAT, "version": 1, "settings": identity}, indent=2) + "\n")


def _score(scorer: Scorer, generations: list[dict[str, Any]], progress: ProgressCallback) -> list[dict[str, Any]]:
    scored = []
    for done, record in enumerate(generations, start=1):
        scored.append({**record, "scores": scorer.score(record["prompt"], record["responses"], record.get("answer"))})
        progress("score", done, len(generations))
    return scored


def _pairs(strategy: str, scored: list[dict[str, Any]], sft_dir: Path, scorer: Scorer,
           generation: GenerationSettings, prompt_format: PromptFormat,
           progress: ProgressCallback) -> list[dict[str, str]]:
    if strategy == "none":
        return []
    if strategy == "paper":
        return paper_pairs(scored)
    greedy = replace(generation, samples=1, temperature=0.0)
    answers = [r[0] for r in generate_responses(Checkpoint(sft_dir), [r["prompt"] for r in scored], greedy,
                                                prompt_format=prompt_format, device=_device(), progress=progress)]
    scores = [scorer.score(r["prompt"], [a], r.get("answer"))[0] for r, a in zip(scored, answers)]
    return source_vs_target_pairs(scored, answers, scores)
