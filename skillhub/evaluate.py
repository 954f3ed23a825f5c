"""Task evaluation: exact match of answers under greedy decoding."""

from __future__ import annotations

import torch

from skillhub.train import collate


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
