"""Scoring a model on an eval set: exact match of answers under greedy decoding, perplexity."""

from __future__ import annotations

import math

import torch

from skillhub.evaluation.datasets import collate


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


def exact_match(model, tokenizer, examples: list[dict[str, str]], *, batch_size: int = 64) -> float:
    """Fraction of examples whose answer greedy decoding reproduces exactly, then stops
    (see :func:`exact_match_each`)."""
    hits = exact_match_each(model, tokenizer, examples, batch_size=batch_size)
    return sum(hits) / len(hits) if hits else 0.0


@torch.no_grad()
def exact_match_each(model, tokenizer, examples: list[dict[str, str]], *, batch_size: int = 64) -> list[bool]:
    """For each example, whether greedy decoding reproduces its answer exactly, then stops.

    Teacher-forced: one forward pass over ``<s> prompt answer </s>``; an example counts
    only if the argmax at every answer position is the answer token and the next is
    ``</s>``. That is exactly when greedy generation would emit the answer and stop,
    without generating token by token.
    """
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(dim=-1)
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        hits.extend(((predicted == targets) | ~scored).all(dim=1).tolist())
    return hits
