"""Scoring a model on an eval set: exact match of greedy answers, and perplexity.

Exact match means what a user means by it: the model answers greedily until the end of its turn
(or EOS), the answer is decoded, and it is compared with the expected one as text, whitespace
normalised (:func:`~skillhub.scoring.prompts.normalize_answer`).

One teacher-forced pass over prompt + answer + end decides most examples without generating:
greedy decoding follows the answer's tokens as long as the argmax at each position is the answer's
token, so up to the first position k where it is not, the greedy answer is known exactly, and its
token k is the argmax there. So:

- no such k: greedy emits the answer's tokens and its end: a hit;
- the argmax at k ends the answer (end of turn or EOS): the greedy answer is the answer's first k
  tokens, compared as text;
- the text of the answer's first k tokens plus the argmax is, normalised, not a prefix of the
  expected answer (and holds no partial UTF-8 character): whatever follows, the greedy answer's
  text starts with it, so it cannot equal the answer: a miss.

Every other example is generated for real (it may still be a hit: the same text in other tokens,
other spacing), with room for as many tokens as the answer has bytes, plus its end: a longer
answer cannot decode to the same text.
"""

from __future__ import annotations

import math

import torch

from skillhub.scoring.datasets import collate, collate_documents
from skillhub.scoring.generation import generate_answers
from skillhub.scoring.prompts import Renderer, as_renderer, check_context, context_length, normalize_answer


@torch.no_grad()
def perplexity(model, renderer: Renderer, examples: list[dict[str, str]], *, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per token) of every example's ``<bos> text <eos>``."""
    renderer = as_renderer(renderer)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_documents(renderer, [e["text"] for e in examples[start:start + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                   ignore_index=-100, reduction="sum")
        total_loss += float(losses)
        total_tokens += int((targets != -100).sum())
    return math.exp(total_loss / total_tokens)


def score(model, renderer: Renderer, examples: list[dict[str, str]], metric: str) -> float:
    """The task score under ``metric`` (exact match in [0, 1], or perplexity)."""
    return exact_match(model, renderer, examples) if metric == "exact_match" else perplexity(model, renderer, examples)


def exact_match(model, renderer: Renderer, examples: list[dict[str, str]], *, batch_size: int = 32) -> float:
    """Fraction of examples whose greedy answer is the expected one (see :func:`exact_match_each`)."""
    hits = exact_match_each(model, renderer, examples, batch_size=batch_size)
    return sum(hits) / len(hits) if hits else 0.0


def exact_match_each(model, renderer: Renderer, examples: list[dict[str, str]], *,
                     batch_size: int = 32) -> list[bool]:
    """For each example, whether the model's greedy answer equals its expected answer as text
    (``renderer``: the prompt format, or a tokenizer read in its default format)."""
    renderer = as_renderer(renderer)
    model.eval()
    verdicts = teacher_forced_verdicts(model, renderer, examples, batch_size=batch_size)
    unsure = [i for i, verdict in enumerate(verdicts) if verdict is None]
    for i, answer in zip(unsure, greedy_answers(model, renderer, [examples[i] for i in unsure],
                                                batch_size=batch_size)):
        verdicts[i] = normalize_answer(answer) == normalize_answer(examples[i]["answer"])
    return verdicts


@torch.no_grad()
def teacher_forced_verdicts(model, renderer: Renderer, examples: list[dict[str, str]], *,
                            batch_size: int = 32) -> list[bool | None]:
    """For each example, the greedy verdict one forward pass proves (see the module docstring), or
    None where only generating can tell."""
    verdicts: list[bool | None] = []
    context = context_length(model)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate(renderer, chunk)
        if context is not None and batch["input_ids"].shape[1] > context:
            for example in chunk:
                check_context(model, renderer.example(example["prompt"], example["answer"])[0], example["prompt"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(dim=-1)
        targets = batch["labels"][:, 1:]
        for row, example in enumerate(chunk):
            scored = targets[row] != -100
            verdicts.append(_verdict(renderer, targets[row][scored].tolist(), predicted[row][scored].tolist(),
                                     example["answer"]))
    return verdicts


def _verdict(renderer: Renderer, answer_ids: list[int], argmax: list[int], answer: str) -> bool | None:
    """The greedy verdict given the answer's ids (its end included) and the argmax at each of their
    positions, or None when it depends on tokens after the first divergence."""
    k = next((i for i, (want, got) in enumerate(zip(answer_ids, argmax)) if want != got), None)
    if k is None:
        return True
    expected = normalize_answer(answer)
    if argmax[k] in renderer.stop_ids:
        return normalize_answer(renderer.decode(answer_ids[:k])) == expected
    start = normalize_answer(renderer.tokenizer.decode(answer_ids[:k] + [argmax[k]], skip_special_tokens=True))
    if "\ufffd" not in start and not expected.startswith(start):
        return False
    return None


def greedy_answers(model, renderer: Renderer, examples: list[dict[str, str]], *, batch_size: int = 32) -> list[str]:
    """The decoded greedy answer to each example's prompt, generated for at most as many tokens as
    the expected answer has bytes, plus one (its end); examples of similar length share a batch."""
    context = context_length(model)
    jobs = []
    for i, example in enumerate(examples):
        ids = renderer.prompt_ids(example["prompt"])
        room = len(example["answer"].encode("utf-8")) + 1
        if context is not None:
            room = max(1, min(room, context - len(ids)))
        jobs.append((room, i, ids))
    jobs.sort()
    answers = [""] * len(examples)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        produced = generate_answers(model, renderer, [ids for _, _, ids in chunk],
                                    max_new_tokens=max(room for room, _, _ in chunk))
        for (_, i, _), ids in zip(chunk, produced):
            answers[i] = renderer.decode(ids)
    return answers
