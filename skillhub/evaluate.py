"""Task evaluation: exact match of answers under greedy decoding."""

from __future__ import annotations

import json
import math
import os

import torch

from skillhub.errors import SkillhubError
from skillhub.jsonio import MAX_TEXT_BYTES, parse_json, read_regular
from skillhub.train import collate


METRICS = {"exact_match": ("prompt", "answer"), "perplexity": ("text",)}


def load_eval_set(path: str | os.PathLike[str], metric: str = "exact_match") -> list[dict[str, str]]:
    """Examples of a JSONL eval file: ``{"prompt", "answer"}`` for exact_match, ``{"text"}`` for perplexity.

    Raises:
        SkillhubError: Unknown metric, unreadable file, a line that is not JSON or lacks a field, no example.
    """
    if metric not in METRICS:
        raise SkillhubError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    fields = METRICS[metric]
    examples = []
    try:
        lines = read_regular(path, what=f"eval file {path}", max_bytes=MAX_TEXT_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SkillhubError(f"cannot read eval file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_json(line, what=f"eval file {path} line {number}")
        if not isinstance(record, dict) or not set(fields) <= record.keys():
            wanted = " and ".join(repr(f) for f in fields)
            raise SkillhubError(f"eval file {path} line {number} needs {wanted} for metric {metric}")
        for field in fields:
            # Numbers are fine as answers; null, true or a list would be scored as their Python text.
            if isinstance(record[field], bool) or not isinstance(record[field], (str, int, float)):
                raise SkillhubError(f"eval file {path} line {number}: {field!r} must be a string, "
                                    f"not {json.dumps(record[field])[:40]}")
        examples.append({field: str(record[field]) for field in fields})
    if not examples:
        raise SkillhubError(f"eval file {path} holds no examples")
    return examples


@torch.no_grad()
def perplexity(model, tokenizer, examples: list[dict[str, str]], *, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per token) of ``<s> text </s>`` over every example."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(tokenizer, [{"prompt": "", "answer": e["text"]} for e in examples[start : start + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum")
        total_loss += float(losses)
        total_tokens += int((targets != -100).sum())
    return math.exp(total_loss / total_tokens)


def score(model, tokenizer, examples: list[dict[str, str]], metric: str) -> float:
    """The task score under ``metric`` (exact match in [0, 1], or perplexity)."""
    return exact_match(model, tokenizer, examples) if metric == "exact_match" else perplexity(model, tokenizer, examples)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[dict[str, str]], *, batch_size: int = 64) -> float:
    """Fraction of examples whose answer greedy decoding reproduces exactly, then stops.

    Teacher-forced: one forward pass over ``<s> prompt answer </s>``; an example counts
    only if the argmax at every answer position is the answer token and the next is
    ``</s>``. That is exactly when greedy generation would emit the answer and stop,
    without generating token by token.
    """
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(dim=-1)
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        correct += int(((predicted == targets) | ~scored).all(dim=1).sum())
    return correct / len(examples) if examples else 0.0
