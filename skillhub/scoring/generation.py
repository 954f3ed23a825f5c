"""Generation from rendered prompts: left-padded batches, stopped at the end of an answer.

Every answer skillhub generates (exact-match scoring, ``generate``, a graft's source) goes
through :func:`generate_answers`, so each stops where the prompt format says an answer ends
(the chat template's end of turn, or EOS) and pads with a token the tokenizer has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from skillhub.scoring.prompts import Renderer


@contextmanager
def quiet_generation() -> Iterator[None]:
    """Silence transformers' warnings about generation flags a model's own generation config sets
    (a temperature under greedy decoding) and about the attention mask of models that pad with
    their end token: skillhub passes what it means explicitly."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.no_grad()
def generate_answers(model, renderer: Renderer, encoded: list[list[int]], *, max_new_tokens: int,
                     samples: int = 1, sampling: dict | None = None, streamer=None,
                     stopping=None) -> list[list[int]]:
    """The answer ids each prompt gets (``samples`` per prompt, in order), each cut at its end.

    Args:
        model: A causal LM.
        renderer: The prompt format the prompts were rendered in (its stop and pad tokens).
        encoded: Rendered prompts (:meth:`Renderer.prompt_ids`).
        max_new_tokens: Most tokens generated per answer.
        samples: Answers per prompt (sampling must then be given).
        sampling: ``temperature``, ``top_p``... for ``model.generate``; None decodes greedily.
        streamer: A transformers ``BaseStreamer`` that sees each step's tokens (a server's streams).
        stopping: A transformers ``StoppingCriteria`` that ends rows early (per-row limits, cancellation).
    """
    width = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    pad = renderer.pad_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    options = {"do_sample": True, **sampling} if sampling else {"do_sample": False, "temperature": None,
                                                                 "top_p": None, "top_k": None}
    with quiet_generation():
        produced = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  num_return_sequences=samples, pad_token_id=pad,
                                  eos_token_id=list(renderer.stop_ids), streamer=streamer,
                                  stopping_criteria=[stopping] if stopping is not None else None, **options)
    return [renderer.answer_of(row[width:].tolist()) for row in produced]
