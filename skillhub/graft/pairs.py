"""Stage 3 and 4 data of a graft: the SFT examples and the DPO preference pairs, from scored responses.

A scored record is ``{"prompt", "answer"?, "responses": [...], "scores": [...]}``, one per prompt.

Pair strategies (``--pairs``):

- ``paper``: chosen = the source's best response, rejected = its worst (paper §3.2, as in
  FuseChat-3.0); prompts whose responses all score the same carry no preference and are left out.
- ``source-vs-target``: chosen = the source's best response, rejected = the SFT target's own
  greedy answer, kept only where the scorer ranks the target's answer lower (SPIN-like).
- ``none``: no DPO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from skillhub.errors import GraftError

PAIR_STRATEGIES = ("paper", "source-vs-target", "none")


def _best(record: dict[str, Any]) -> int:
    """Index of the best response (the first of equals: responses are in sampling order)."""
    scores = record["scores"]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def sft_examples(records: Sequence[dict[str, Any]], *, min_score: float | None) -> list[dict[str, str]]:
    """The best response to each prompt, as ``{"prompt", "completion"}``; with ``min_score``,
    prompts whose best response scores lower are left out."""
    examples = []
    for record in records:
        best = _best(record)
        if record["responses"][best] and (min_score is None or record["scores"][best] >= min_score):
            examples.append({"prompt": record["prompt"], "completion": record["responses"][best]})
    if not examples:
        floor = f" scores at least {min_score}" if min_score is not None else " is non-empty"
        raise GraftError(f"no prompt has a source response that{floor}, so there is nothing to fine-tune on: "
                         "sample more (--samples, --temperature), or lower --min-score")
    return examples


def paper_pairs(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Best against worst response of the source, where they score differently."""
    pairs = []
    for record in records:
        scores = record["scores"]
        best = _best(record)
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] > scores[worst] and record["responses"][best]:
            pairs.append({"prompt": record["prompt"], "chosen": record["responses"][best],
                          "rejected": record["responses"][worst]})
    return pairs


def source_vs_target_pairs(records: Sequence[dict[str, Any]], target_answers: Sequence[str],
                           target_scores: Sequence[float]) -> list[dict[str, str]]:
    """The source's best response against the target's own answer, where the target's scores lower."""
    pairs = []
    for record, answer, score in zip(records, target_answers, target_scores, strict=True):
        best = _best(record)
        if record["scores"][best] > score and record["responses"][best] != answer:
            pairs.append({"prompt": record["prompt"], "chosen": record["responses"][best], "rejected": answer})
    return pairs
