"""Stage 1 of a graft: the source model answers every prompt, several times, by sampling.

Only text leaves this module: the source keeps its own architecture, tokenizer and chat
template (applied when its tokenizer has one), so any source and target pair works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from skillhub.errors import CheckpointError, GraftError
from skillhub.io.checkpoint import Checkpoint, open_checkpoint
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers


# Files one of which a saved tokenizer has (fast, sentencepiece, or BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class GenerationSettings:
    """How the source samples: ``samples`` responses per prompt (temperature 0: one, greedy)."""

    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise GraftError("samples, max new tokens and batch size must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise GraftError(f"temperature must be >= 0 and top-p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.temperature == 0 and self.samples > 1:
            raise GraftError(f"temperature 0 decodes greedily and gives one response per prompt, not {self.samples}: "
                             "raise --temperature or give --samples 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_model(ref: str | os.PathLike[str], *, revision: str | None, role: str) -> Checkpoint:
    """A source or target model's checkpoint (a local directory, or a Hub id downloaded)."""
    try:
        return open_checkpoint(ref, revision=revision)
    except CheckpointError as exc:
        raise GraftError(f"the {role} model cannot be used: {exc}") from exc


def load_tokenizer(checkpoint: Checkpoint, *, role: str):
    """The model's own tokenizer, or a GraftError saying that it cannot produce text."""
    from transformers import AutoTokenizer

    if not any((checkpoint.path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would otherwise make up an empty tokenizer from the model type
        raise GraftError(f"the {role} model {checkpoint.ref.id} has no usable tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)}): save its tokenizer with the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError, TypeError) as exc:
        raise GraftError(f"the {role} model {checkpoint.ref.id} has no usable tokenizer ({str(exc).splitlines()[0]}): "
                         "save its tokenizer with the model") from exc
    if not hasattr(tokenizer, "decode") or tokenizer.eos_token_id is None:
        raise GraftError(f"the {role} model {checkpoint.ref.id} has no tokenizer with an end-of-sequence token: "
                         "it cannot end a response")
    return tokenizer


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model expects it: its chat template's user turn, or ``<s>`` + the text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    return [tokenizer.bos_token_id, *ids] if needs_bos(tokenizer) else ids


def needs_bos(tokenizer) -> bool:
    """Whether a plain prompt must be given the tokenizer's ``<s>`` by hand: it has one, and
    encoding does not add it (skillhub's scoring reads ``<s> prompt answer </s>``)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] != [bos]


@contextmanager
def _no_padding_warning() -> Iterator[None]:
    """Silence transformers' "pass an attention_mask" warning, which GPT-2-style models (padding
    with their begin/end token) give even though the mask is passed."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.no_grad()
def generate_responses(source: Checkpoint, prompts: list[str], settings: GenerationSettings, *,
                       device: str = "cpu", progress: ProgressCallback = no_progress) -> list[list[str]]:
    """``settings.samples`` responses of the source to each prompt, decoded to text.

    Prompts are left-padded into batches; each batch draws from its own seed, so a rerun of the
    same batch gives the same responses.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source, role="source")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as exc:
        raise GraftError(f"the source model {source.ref.id} cannot generate: {str(exc).splitlines()[0]}") from exc
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = settings.temperature > 0
    responses: list[list[str]] = []
    for start in range(0, len(prompts), settings.batch_size):
        encoded = [prompt_ids(tokenizer, p) for p in prompts[start:start + settings.batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        torch.manual_seed(settings.seed + start)
        with _no_padding_warning():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
                do_sample=sampling, num_return_sequences=settings.samples, pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} if sampling else {}),
            )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        responses += [[t.strip() for t in texts[i:i + settings.samples]] for i in range(0, len(texts), settings.samples)]
        progress("generate", min(start + settings.batch_size, len(prompts)), len(prompts))
    return responses
