"""Eval sets (JSONL files of prompt/answer or text) and the batches a causal LM is scored
and trained on, rendered by a :class:`~skillhub.scoring.prompts.Renderer`."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from skillhub.errors import SkillhubError
from skillhub.io.jsonio import MAX_TEXT_BYTES, parse_json, read_regular
from skillhub.scoring.prompts import Renderer, as_renderer

METRICS = {"exact_match": ("prompt", "answer"), "perplexity": ("text",)}
HELDOUT_EVERY = 5


def is_heldout(prompt: str) -> bool:
    """The stable held-out split of a prompt set (the router's, a graft's): 1 prompt in
    HELDOUT_EVERY, by a hash of the prompt, so it is the same across runs and machines."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()[0] % HELDOUT_EVERY == 0


def load_eval_set(path: str | os.PathLike[str], metric: str = "exact_match") -> list[dict[str, str]]:
    """Examples of a JSONL eval file: ``{"prompt", "answer"}`` for exact_match, ``{"text"}`` for perplexity.

    Raises:
        SkillhubError: Unknown metric, unreadable file, a line that is not JSON or lacks a field, no example.
    """
    if metric not in METRICS:
        raise SkillhubError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return _load_records(path, METRICS[metric], (), what=f"eval file {path}", why=f" for metric {metric}")


def load_prompts(path: str | os.PathLike[str], *, with_task: bool = False,
                 what: str = "routing examples") -> list[dict[str, str]]:
    """Prompts of a JSONL file (routing examples, a graft's prompts): ``{"prompt"}``, with an
    optional ``"answer"`` (and a required ``"task"`` with ``with_task``). Lines whose prompt is
    blank are not usable and are left out.

    Raises:
        SkillhubError: As :func:`load_eval_set`, or no line has a usable prompt.
    """
    fields = ("prompt", "task") if with_task else ("prompt",)
    records = _load_records(path, fields, ("answer",), what=f"{what} {path}", why="")
    usable = [r for r in records if r["prompt"].strip()]
    if not usable:
        raise SkillhubError(f"{what} {path} has no usable lines: every \"prompt\" is blank")
    return usable


def _load_records(path: str | os.PathLike[str], fields: tuple[str, ...], optional: tuple[str, ...], *,
                  what: str, why: str) -> list[dict[str, str]]:
    examples = []
    try:
        lines = read_regular(path, what=what, max_bytes=MAX_TEXT_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SkillhubError(f"cannot read {what}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_json(line, what=f"{what} line {number}")
        if not isinstance(record, dict) or not set(fields) <= record.keys():
            wanted = " and ".join(repr(f) for f in fields)
            raise SkillhubError(f"{what} line {number} needs {wanted}{why}")
        present = [*fields, *(f for f in optional if f in record)]
        for field in present:
            # Numbers are fine as answers; null, true or a list would be scored as their Python text.
            if isinstance(record[field], bool) or not isinstance(record[field], (str, int, float)):
                raise SkillhubError(f"{what} line {number}: {field!r} must be a string, "
                                    f"not {json.dumps(record[field])[:40]}")
        examples.append({field: str(record[field]) for field in present})
    if not examples:
        raise SkillhubError(f"{what} holds no examples")
    return examples


def collate(renderer: Renderer, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt + answer (:meth:`Renderer.example`) with input_ids,
    attention_mask and labels (the prompt and the padding masked out with -100)."""
    renderer = as_renderer(renderer)
    return _pad([renderer.example(e["prompt"], e["answer"]) for e in examples], renderer.pad_id)


def collate_documents(renderer: Renderer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch of documents (:meth:`Renderer.document_ids`), every token a label but the first."""
    encoded = []
    for text in texts:
        ids = renderer.document_ids(text)
        encoded.append((ids, [-100, *ids[1:]]))
    return _pad(encoded, renderer.pad_id)


def _pad(encoded: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
