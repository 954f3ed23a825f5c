"""Whether a graft taught the target anything: scores of every model along the way.

The prompts are split by a hash of each prompt: one in five (with at least ten prompts) is held
out of generation and training, and scored at the end. Each model answers the held-out prompts
greedily, until the end of its turn, and the graft's scorer scores the answers, as it scored the
source's samples: the source (in its own prompt format), the target before, after SFT, after
DPO, and the target with the pack applied (in the graft's prompt format). With an eval set
(``--eval``), each target model is also scored on it by exact match, as ``task add`` scores it.

When the target learned nothing (its best held-out score after training is not above its score
before), :func:`verdict` says so in one line, with what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from skillhub.graft.generation import GenerationSettings, answer_with, load_model
from skillhub.graft.scorers import Scorer
from skillhub.io.checkpoint import Checkpoint
from skillhub.progress import ProgressCallback, no_progress
from skillhub.scoring.datasets import is_heldout
from skillhub.scoring.prompts import PromptFormat, Renderer
from skillhub.scoring.scores import exact_match

MIN_PROMPTS_FOR_HELDOUT = 10
MODELS = ("source", "target_before", "sft", "dpo", "pack")


def split_heldout(records: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(trained on, held out): 1 prompt in HELDOUT_EVERY by hash, none under MIN_PROMPTS_FOR_HELDOUT."""
    if len(records) < MIN_PROMPTS_FOR_HELDOUT:
        return records, []
    held = [is_heldout(r["prompt"]) for r in records]
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


@dataclass
class GraftScores:
    """Held-out (and eval-set) scores of each model of a graft; None where a model was not scored."""

    heldout_prompts: int = 0
    heldout: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(MODELS))
    eval: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(MODELS[1:]))

    def as_dict(self) -> dict[str, Any]:
        return {"heldout_prompts": self.heldout_prompts, "heldout": self.heldout, "eval": self.eval}

    def learned(self) -> bool | None:
        """Whether a trained model beats the target before training (None: nothing to compare, or,
        on the held-out prompts, a source that does no better than the target did: nothing the
        scorer can see was there to learn)."""
        teachable = self.heldout.get("source") is None or self.heldout["source"] > (self.heldout["target_before"] or 0)
        for scores in ((self.heldout, self.eval) if teachable else (self.eval,)):
            before = scores.get("target_before")
            after = [scores[k] for k in ("sft", "dpo", "pack") if scores.get(k) is not None]
            if before is not None and after:
                return max(after) > before
        return None


class Checker:
    """Scores the models of one graft on its held-out prompts and eval set."""

    def __init__(self, heldout: list[dict[str, str]], scorer: Scorer, eval_examples: list[dict[str, str]] | None,
                 prompt_format: PromptFormat, generation: GenerationSettings, *, device: str,
                 progress: ProgressCallback = no_progress) -> None:
        self.heldout, self.scorer, self.eval_examples = heldout, scorer, eval_examples
        self.prompt_format, self.device, self.progress = prompt_format, device, progress
        self.greedy = replace(generation, samples=1, temperature=0.0)
        self.scores = GraftScores(heldout_prompts=len(heldout))

    def score(self, name: str, checkpoint: Checkpoint, *, packs: Sequence[Any] = (), own_format: bool = False) -> None:
        """Score the model in ``checkpoint`` (with ``packs`` applied) as ``name``; the source reads
        prompts in its own format (``own_format``), every target model in the graft's."""
        if not self.heldout and self.eval_examples is None:
            return
        model, tokenizer = load_model(checkpoint, role="source" if own_format else "target", device=self.device)
        patcher = None
        if packs:
            from skillhub.activation import Patcher

            patcher = Patcher(model)
            patcher.use(list(packs))
        try:
            renderer = Renderer(tokenizer, PromptFormat() if own_format else self.prompt_format,
                                what=f"the {name} model")
            if self.heldout:
                answers = answer_with(model, renderer, [r["prompt"] for r in self.heldout], self.greedy)
                values = [self.scorer.score(r["prompt"], [a[0]], r.get("answer"))[0]
                          for r, a in zip(self.heldout, answers)]
                self.scores.heldout[name] = sum(values) / len(values)
            if self.eval_examples is not None and not own_format:
                self.scores.eval[name] = exact_match(model, renderer, self.eval_examples)
        finally:
            if patcher is not None:
                patcher.restore()
            del model
        self.progress("check", MODELS.index(name) + 1, len(MODELS))

    def score_dir(self, name: str, model_dir: Path | None) -> None:
        if model_dir is not None and (model_dir / "config.json").is_file():
            self.score(name, Checkpoint(model_dir))


def verdict(scores: GraftScores, *, sft_learning_rate: float) -> str | None:
    """One line when the target learned nothing, with what to change; None when it did (or when
    nothing could be compared)."""
    if scores.learned() is not False:
        return None
    shown = ", ".join(f"{k} {v:.2f}" for k, v in (scores.heldout if scores.heldout_prompts else scores.eval).items()
                      if v is not None)
    return (f"the target did not learn the task (held-out scores: {shown}): at --sft-lr {sft_learning_rate:g} "
            "it barely moved; for a target under 1B parameters use --preset small (or raise --sft-lr and "
            "--sft-epochs), and check that the source's answers score well")

