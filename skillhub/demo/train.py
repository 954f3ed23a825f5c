"""Full fine-tuning of a causal LM on prompt/answer pairs, small enough for 2 CPU cores.

Used by the demo and the tests to produce genuine fine-tunes (and so genuine deltas).
The loss covers the answer tokens and the token that ends the answer only.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.scoring.datasets import collate
from skillhub.scoring.prompts import PromptFormat, Renderer


def finetune(
    model_dir: str | os.PathLike[str],
    examples: list[dict[str, str]],
    output: str | os.PathLike[str],
    *,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 20,
    seed: int = 0,
    prompt_format: PromptFormat = PromptFormat(),
    device: str = "cpu",
    progress: ProgressCallback = no_progress,
) -> Path:
    """Fine-tune every parameter of the model in ``model_dir`` and save it to ``output``, on the
    examples rendered in ``prompt_format`` (the chat template's turn for a chat model).

    The rate warms up linearly over ``warmup_steps``, then decays linearly to zero. AdamW without
    weight decay, so parameters the task never touches (unused token embeddings) keep their exact
    base values and the delta stays honest.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    renderer = Renderer(tokenizer, prompt_format)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) * (1 - step / steps))
    for step in range(steps):
        batch = collate(renderer, rng.sample(examples, min(batch_size, len(examples))))
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress("train", step + 1, steps)
    model.eval().to("cpu")
    output = Path(output)
    with quiet_transformers():
        model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
