"""Stage 1 of a graft: the source model answers every prompt, several times, by sampling.

Only text leaves this module: the source keeps its own architecture, tokenizer and prompt
format (its chat template when it has one, see :mod:`skillhub.scoring.prompts`), and each
response ends at the source's own end of turn, so any source and target pair works.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from skillhub.errors import CheckpointError, GraftError
from skillhub.io.checkpoint import Checkpoint, open_checkpoint
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.scoring.generation import generate_answers
from skillhub.scoring.prompts import PromptFormat, Renderer


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


def load_model(checkpoint: Checkpoint, *, role: str, device: str = "cpu"):
    """(model in float32 on ``device``, in eval mode; its tokenizer), or a GraftError naming the role."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(checkpoint, role=role)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as exc:
        raise GraftError(f"the {role} model {checkpoint.ref.id} cannot generate: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def generate_responses(source: Checkpoint, prompts: list[str], settings: GenerationSettings, *,
                       prompt_format: PromptFormat = PromptFormat(), device: str = "cpu",
                       progress: ProgressCallback = no_progress) -> list[list[str]]:
    """``settings.samples`` responses of the model in ``source`` to each prompt, decoded to text
    (see :func:`answer_with`)."""
    model, tokenizer = load_model(source, role="source", device=device)
    renderer = Renderer(tokenizer, prompt_format, what=f"the model {source.ref.id}")
    return answer_with(model, renderer, prompts, settings, progress=progress)


@torch.no_grad()
def answer_with(model, renderer: Renderer, prompts: list[str], settings: GenerationSettings, *,
                progress: ProgressCallback = no_progress) -> list[list[str]]:
    """``settings.samples`` responses of ``model`` to each prompt rendered by ``renderer``.

    Prompts are left-padded into batches; each batch draws from its own seed, so a rerun of the
    same batch gives the same responses.
    """
    sampling = ({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
                if settings.temperature > 0 else None)
    responses: list[list[str]] = []
    for start in range(0, len(prompts), settings.batch_size):
        encoded = [renderer.prompt_ids(p) for p in prompts[start:start + settings.batch_size]]
        torch.manual_seed(settings.seed + start)
        answers = generate_answers(model, renderer, encoded, max_new_tokens=settings.max_new_tokens,
                                   samples=settings.samples, sampling=sampling)
        texts = [renderer.decode(ids) for ids in answers]
        responses += [texts[i:i + settings.samples] for i in range(0, len(texts), settings.samples)]
        progress("generate", min(start + settings.batch_size, len(prompts)), len(prompts))
    return responses
