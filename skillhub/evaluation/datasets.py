"""Eval sets (JSONL files of prompt/answer or text) and the batches a causal LM is scored
and trained on."""

from __future__ import annotations

import json
import os

import torch

from skillhub.errors import SkillhubError
from skillhub.io.jsonio import MAX_TEXT_BYTES, parse_json, read_regular

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


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of ``<s> prompt answer </s>`` and labels that mask out the prompt with -100."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    answer_ids = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(tokenizer, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch with input_ids, attention_mask and labels."""
    encoded = [encode_example(tokenizer, e["prompt"], e["answer"]) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


