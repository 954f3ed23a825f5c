"""``skillhub demo``: the story on real pretrained models from PyPI (see :mod:`skillhub.demo.real_models`).

SmolLM2-135M-Instruct is the base. Three natural-language skills (:mod:`skillhub.demo.skills`:
facts about a fictional product, a JSON format, a unit conversion) are each learned by a full
fine-tune of every parameter, on conversations rendered by its chat template with the loss on the
answer, then compressed into a pack and added to a fresh registry, where every task (declared
before any pack, so the base's scores are on record) is scored at each addition. Then:

- a router is trained on the skills' training prompts and on general chat prompts for the base
  class, and sends held-out prompts, with no task label, to a pack or to the base;
- a fourth skill, writing dates out, is learned by Gemma-3-270M (another architecture, a
  SentencePiece tokenizer of 262k tokens, no chat template) and grafted into the base
  (``skillhub graft``: the source answers, SFT then DPO of the base on TRL, a pack);
- one pack is removed: its task is back at the base's score exactly, the others keep theirs;
- a pack is exported as a PEFT LoRA adapter and loaded by PEFT (the export's logit check);
- every score skillhub recorded is checked against an independent scorer: transformers'
  ``apply_chat_template`` and ``generate`` on the activated model, answers compared as text.

Example answers are shown before and after. On a GPU (CUDA) the fine-tunes use it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from skillhub.compress.options import CompressionOptions
from skillhub.compress.pipeline import create_pack
from skillhub.demo.real_models import real_model
from skillhub.demo.skills import GRAFTED, SKILLS, dates, general
from skillhub.demo.synthetic import write_jsonl
from skillhub.demo.train import finetune
from skillhub.evaluation.forgetting import accuracy_matrices, add_and_score, declare_task, evaluate_tasks
from skillhub.io.outputs import replace_directory
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.registry.front import Registry
from skillhub.routing.generate import Generator
from skillhub.routing.training import train_router
from skillhub.scoring.prompts import normalize_answer
from skillhub.scoring.scores import exact_match

# Measured on 2 CPU cores (docs/benchmarks.md, "The demo"): enough steps for each skill to be learned, the
# rate at its peak after two of them.
STEPS = {"zentro": 24, "extract": 12, "convert": 12}
BATCH_SIZE, LEARNING_RATE, WARMUP_STEPS = 8, 1e-4, 2
SOURCE_STEPS = 20  # Gemma-3-270M learning to write dates out
GRAFT_PROMPTS = 120
SHOWN = {"zentro": 0, "extract": 0, "convert": 0, "dates": 0}  # which eval example of each skill is shown


def run_real_demo(workdir: str | os.PathLike[str], *, seed: int = 0,
                  progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Run the real-model demo in ``workdir`` (replacing earlier demo output there); returns its measurements."""
    laps = _Laps(progress)
    base, gemma = real_model("smollm2"), real_model("gemma3")
    workdir = replace_directory(workdir, kind="demo")
    data = {task: make(seed) for task, make in SKILLS.items()}
    data[GRAFTED] = dates(seed, train=GRAFT_PROMPTS)
    chat = general()
    chat_train, chat_heldout = chat[: len(chat) * 2 // 3], chat[len(chat) * 2 // 3:]
    files = workdir / "data"
    files.mkdir()
    registry = Registry(workdir / "registry")
    registry.register_base(base)
    loaded = registry.load_base_model()[:2]
    for task, (train, test) in data.items():  # declared first: the base's score on each is step zero
        declare_task(registry, task, write_jsonl(test, files / f"{task}-eval.jsonl"), loaded=loaded)
        if task in SKILLS:
            registry.add_routing_examples(task, write_jsonl(train, files / f"{task}-route.jsonl"))
    registry.add_routing_examples("@base", write_jsonl(chat_train, files / "general-route.jsonl"))
    shown = [data[t][1][SHOWN[t]]["prompt"] for t in data] + [chat_heldout[0]["prompt"]]
    before = _answers(registry, shown, packs=[])
    del loaded
    laps.lap("setup")

    packs, retention = {}, {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for task in SKILLS:
        train, test = data[task]
        tuned = finetune(base, train, workdir / "tuned" / task, steps=STEPS[task], batch_size=BATCH_SIZE,
                         learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, seed=seed, device=device,
                         progress=progress)
        finetuned = _score_dir(tuned, test)
        pack = create_pack(base, tuned, workdir / "packs" / task, task=task, progress=progress,
                           **CompressionOptions(seed=seed).as_kwargs())
        shutil.rmtree(tuned)  # the pack is what remains of the fine-tune
        added = add_and_score(registry, pack, task=task, merge=None, progress=progress)
        subset = next(r["score"] for r in added.scores if r["task"] == task and r["policy"] == "subset")
        packs[task] = added.entry.id
        retention[task] = {"fine-tune": finetuned, "pack": subset, "ratio": pack.manifest.ratio,
                           "bytes": pack.manifest.stored_bytes}
        laps.lap(task)

    router = train_router(registry, progress=progress)
    routing = _route_heldout(registry, data, chat_heldout)
    laps.lap("router")
    grafting = _graft(registry, base, gemma, data[GRAFTED], workdir, seed, device, progress)
    if "pack_id" in grafting:
        packs[GRAFTED] = grafting["pack_id"]
        train_router(registry, progress=progress)  # the grafted pack joins the router's classes
    laps.lap(GRAFTED)
    after = _answers(registry, shown, route=True)
    independent = _independent_scores(registry, data)
    laps.lap("checks")
    matrices = accuracy_matrices(registry)
    removal = _remove(registry, packs, "zentro", matrices)
    laps.lap("removal")
    export = _export(registry, packs["extract"], workdir / "peft-extract", progress)
    laps.lap("peft")
    return {
        "base": str(base), "source": str(gemma), "seed": seed, "skills": list(SKILLS), "grafted": GRAFTED,
        "steps": STEPS, "retention": retention, "packs": packs, "matrices": matrices,
        "router": {"heldout_accuracy": router.router.info["accuracy"]["heldout"], "warnings": list(router.warnings),
                   **routing},
        "graft": grafting, "removal": removal, "peft": export, "independent": independent,
        "examples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(shown, before, after)],
        "seconds": round(sum(laps.seconds.values()), 1), "stage_seconds": laps.seconds,
        "paths": {"registry": str(registry.url), "workdir": str(workdir)},
    }


class _Laps:
    """Seconds spent in each stage of the demo, for the report's line on where the time went; each
    finished stage also moves the whole demo's progress bar (its ETA)."""

    STAGES = 6 + len(SKILLS)  # setup, each skill, router, the graft, checks, removal, PEFT

    def __init__(self, progress: ProgressCallback) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress
        self._last = time.perf_counter()
        progress("demo", 0, self.STAGES)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 1)
        self._last = now
        self.progress("demo", len(self.seconds), self.STAGES)


def _score_dir(model_dir: Path, test: list[dict[str, str]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return exact_match(model, AutoTokenizer.from_pretrained(model_dir), test)


def _answers(registry: Registry, prompts: list[str], **choice) -> list[dict[str, Any]]:
    with Generator(registry, max_new_tokens=32) as generator:
        return [{"output": g.output, "task": g.task, "probability": g.probability}
                for g in generator.generate(prompts, **choice)]


def _route_heldout(registry: Registry, data: dict[str, Any], chat_heldout: list[dict[str, str]]) -> dict[str, Any]:
    """Where the router sends the skills' eval prompts and held-out general chat, with no task label."""
    with Generator(registry) as generator:
        rows = [(task, e["prompt"]) for task in SKILLS for e in data[task][1]]
        rows += [(None, e["prompt"]) for e in chat_heldout]
        decisions = generator.decide([p for _, p in rows], route=True)
    right = {}
    for (task, _), decision in zip(rows, decisions):
        right.setdefault(task or "base", []).append(decision.task == task if task else not decision.packs)
    return {"correct": {k: sum(v) / len(v) for k, v in right.items()}, "prompts": len(rows)}


def _graft(registry: Registry, base: Path, gemma: Path, data: tuple[list, list], workdir: Path, seed: int,
           device: str, progress: ProgressCallback) -> dict[str, Any]:
    """Gemma-3-270M learns to write dates out, then ``graft`` gives the skill to the base as a pack."""
    from skillhub.errors import GraftError
    from skillhub.graft import GenerationSettings, TrainingSettings, graft
    from skillhub.graft.training import require_trl

    try:
        require_trl()
    except GraftError as exc:
        return {"task": GRAFTED, "skipped": str(exc)}
    train, test = data
    folder = workdir / "graft"
    source = finetune(gemma, train, folder / "source", steps=SOURCE_STEPS, batch_size=BATCH_SIZE,
                      learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, seed=seed, device=device,
                      progress=progress)
    result = graft(source, base, write_jsonl(train, folder / "prompts.jsonl"), workdir / "packs" / GRAFTED,
                   task=GRAFTED, work_dir=folder / "work", preset="small",
                   generation=GenerationSettings(samples=2, temperature=0.7, max_new_tokens=12, batch_size=32),
                   sft=TrainingSettings(steps=24, batch_size=BATCH_SIZE),
                   dpo=TrainingSettings(steps=8, batch_size=BATCH_SIZE), min_score=1.0,
                   compression=CompressionOptions(seed=seed), add_to=registry, merge=None,
                   eval_file=workdir / "data" / f"{GRAFTED}-eval.jsonl", progress=progress)
    shutil.rmtree(folder / "source")
    return {"task": GRAFTED, "scores": result.scores.as_dict(), "warning": result.warning,
            "sft_examples": result.sft_examples, "pairs": result.pairs, "seconds": result.seconds,
            "ratio": result.pack.manifest.ratio, "pack_id": result.added.entry.id}


@torch.no_grad()
def _independent_scores(registry: Registry, data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's score under its own set by skillhub's scorer and by transformers alone:
    ``apply_chat_template`` with the generation prompt, greedy ``generate`` until <|im_end|> or EOS,
    the decoded answer compared with the expected one as text."""
    model, tokenizer, _ = registry.load_base_model()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores = {}
    for task, (_, test) in data.items():
        if not any(t.name == task and t.packs for t in registry.tasks()):
            continue
        with registry.activated(model, task=task, verify=False):
            hits = 0
            for example in test:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}],
                                                    add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)["input_ids"]
                output = model.generate(ids, max_new_tokens=48, do_sample=False, temperature=None, top_p=None,
                                        top_k=None, eos_token_id=[end_of_turn, tokenizer.eos_token_id],
                                        pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
                hits += normalize_answer(text) == normalize_answer(example["answer"])
            skillhub_score = exact_match(model, tokenizer, test)
        scores[task] = {"skillhub": skillhub_score, "independent": hits / len(test), "examples": len(test)}
    return scores


def _remove(registry: Registry, packs: dict[str, str], task: str, matrices: dict[str, Any]) -> dict[str, Any]:
    """Remove ``task``'s pack: its score under its own set goes back to the base's; the others stay.
    The scores before are the ones recorded at the last addition (the last row of R)."""
    before = dict(zip(matrices["tasks"], matrices["policies"]["subset"]["R"][-1]))
    base = dict(zip(matrices["tasks"], matrices["base"]))
    registry.remove(packs[task])
    after = {r["task"]: r["score"] for r in evaluate_tasks(registry, merge=None) if r["policy"] == "subset"}
    return {"task": task, "pack": packs[task], "base": base[task], "before": before, "after": after}


def _export(registry: Registry, pack_id: str, output: Path, progress: ProgressCallback) -> dict[str, Any]:
    """The pack as a PEFT LoRA adapter, loaded back by PEFT for the logit check."""
    from skillhub.sharing.peft_export import export_peft

    exported = export_peft(pack_id, output, registry=registry, progress=progress)
    return {"path": str(exported.path), "rank": exported.rank, "adapter_bytes": exported.adapter_bytes,
            "relative_error": exported.check.relative_error if exported.check else None}
