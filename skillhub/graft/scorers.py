"""Scorers: how a graft ranks the source's responses to one prompt (best for SFT, pairs for DPO).

A scorer is named on the command line as ``NAME`` or ``NAME:ARGUMENT`` and found through the
``skillhub.scorers`` entry points, the built-ins included, so a plugin scorer is used exactly
like one of these:

- ``exact``: 1.0 when the response equals the prompt's reference ``answer`` as text, whitespace
  normalised (as skillhub's exact match compares), else 0.0. Every prompt needs an answer.
- ``rule:MODULE:FUNCTION`` (or ``rule:path/to/file.py:FUNCTION``): a Python callable of the
  user's, ``FUNCTION(prompt, response, answer) -> float | bool`` (``answer`` is None when the
  prompt has none). This **imports and runs the user's code**, as ``python -c`` would.
- ``reward:MODEL``: a Hugging Face sequence-classification reward model with one output (safetensors, a
  local directory or a Hub id); the score is its logit for ``prompt + response`` (with the
  reward model's chat template when it has one).

A plugin is a class taking the argument (a string, or None) and providing :class:`Scorer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from skillhub.errors import GraftError
from skillhub.graft.generation import open_model
from skillhub.progress import quiet_transformers
from skillhub.scoring.prompts import normalize_answer

ENTRY_POINT_GROUP = "skillhub.scorers"


@runtime_checkable
class Scorer(Protocol):
    """Ranks the responses to one prompt: a higher score is a better response."""

    name: str
    needs_answer: bool  # every prompt must carry a reference answer

    def score(self, prompt: str, responses: Sequence[str], answer: str | None) -> list[float]:
        """One finite score per response."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this scorer (its name and settings, JSON-able)."""
        ...


class ExactScorer:
    """1.0 for a response equal to the reference answer, else 0.0."""

    name = "exact"
    needs_answer = True

    def __init__(self, argument: str | None = None) -> None:
        if argument:
            raise GraftError(f"scorer exact takes no argument, got {argument!r}: write --scorer exact")

    def score(self, prompt: str, responses: Sequence[str], answer: str | None) -> list[float]:
        return [float(normalize_answer(r) == normalize_answer(answer or "")) for r in responses]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class RuleScorer:
    """A user's Python function ``(prompt, response, answer) -> float | bool``."""

    name = "rule"
    needs_answer = False

    def __init__(self, argument: str | None) -> None:
        if not argument or ":" not in argument:
            raise GraftError("scorer rule needs the function to call: --scorer rule:MODULE:FUNCTION "
                             "(or rule:path/to/file.py:FUNCTION)")
        self.target = argument
        module_name, _, function_name = argument.rpartition(":")
        module = _import_user_module(module_name)
        function = getattr(module, function_name, None)
        if not callable(function):
            raise GraftError(f"scorer rule: {module_name} has no function {function_name!r}")
        self.function: Callable[[str, str, str | None], float | bool] = function

    def score(self, prompt: str, responses: Sequence[str], answer: str | None) -> list[float]:
        scores = []
        for response in responses:
            value = self.function(prompt, response, answer)
            if isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(value):
                scores.append(float(value))
            else:
                raise GraftError(f"scorer rule:{self.target} returned {value!r} for a response to {prompt[:40]!r}: "
                                 "it must return a finite number or a bool")
        return scores

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "function": self.target}


def _import_user_module(module_name: str):
    path = Path(module_name)
    try:
        if module_name.endswith(".py"):
            if not path.is_file():
                raise GraftError(f"scorer rule: no file {path}")
            spec = importlib.util.spec_from_file_location(f"skillhub_user_rule_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except GraftError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module can fail in any way; say which and how
        raise GraftError(f"scorer rule: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc


class RewardScorer:
    """The logit of a sequence-classification reward model (one label) for prompt + response."""

    name = "reward"
    needs_answer = False

    def __init__(self, argument: str | None, *, batch_size: int = 16) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if not argument:
            raise GraftError("scorer reward needs a model: --scorer reward:MODEL (a directory or a Hub id)")
        self.model_id, self.batch_size = argument, batch_size
        location = open_model(argument, revision=None, role="reward").path  # safetensors only
        try:
            config = AutoConfig.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise GraftError(f"reward model {argument} cannot be read: {str(exc).splitlines()[0]}") from exc
        architectures = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
            raise GraftError(f"reward model {argument} is not a sequence-classification model with one output "
                             f"(architectures {architectures or 'unknown'}, {config.num_labels} labels): "
                             "give a reward model, e.g. one trained with TRL's RewardTrainer")
        with quiet_transformers():
            self.model = AutoModelForSequenceClassification.from_pretrained(location, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _text(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        return prompt + response

    @torch.no_grad()
    def score(self, prompt: str, responses: Sequence[str], answer: str | None) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            texts = [self._text(prompt, r) for r in responses[start:start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id}


def scorer_names() -> list[str]:
    """Every installed scorer name, built-ins included."""
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_scorer(spec: str) -> Scorer:
    """The scorer ``NAME`` or ``NAME:ARGUMENT`` (see the module docstring).

    Raises:
        GraftError: No such scorer, two distributions register it, or it refuses its argument.
    """
    name, _, argument = spec.partition(":")
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise GraftError(f"unknown scorer {name!r}: installed are {', '.join(scorer_names()) or 'none'}")
    if len({ep.value for ep in found}) > 1:
        raise GraftError(f"scorer {name!r} is registered by several distributions "
                         f"({', '.join(sorted({ep.value for ep in found}))}): uninstall all but one")
    try:
        factory = found[0].load()
    except Exception as exc:  # noqa: BLE001 - a plugin that fails to import: name it
        raise GraftError(f"scorer {name!r} ({found[0].value}) failed to import: {type(exc).__name__}: {exc}") from exc
    scorer = factory(argument or None)
    if not isinstance(scorer, Scorer):
        raise GraftError(f"scorer {name!r} ({found[0].value}) does not provide score(), describe(), name "
                         "and needs_answer")
    return scorer
