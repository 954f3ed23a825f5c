"""Task evaluation: exact match of answers under greedy decoding."""

from __future__ import annotations

import json
import os

import torch

from skillhub.errors import SkillhubError
from skillhub.train import collate


def load_eval_examples(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Prompt/answer pairs of a JSONL eval file.

    Raises:
        SkillhubError: The file is unreadable, a line is not JSON or lacks a field, or it holds no example.
    """
    examples = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SkillhubError(f"cannot read eval file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SkillhubError(f"eval file {path} line {number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not {"prompt", "answer"} <= record.keys():
            raise SkillhubError(f"eval file {path} line {number} needs 'prompt' and 'answer' fields")
        examples.append({"prompt": str(record["prompt"]), "answer": str(record["answer"])})
    if not examples:
        raise SkillhubError(f"eval file {path} holds no examples")
    return examples


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
