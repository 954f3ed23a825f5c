"""Stages 3 and 4 of a graft: full fine-tuning of the target on TRL's ``SFTTrainer``, then
``DPOTrainer`` (the only module that imports ``trl`` and ``datasets``).

Examples reach TRL already tokenized by the target's prompt format
(:class:`~skillhub.scoring.prompts.Renderer`): the rendered prompt's ids with the response's ids
and its end-of-turn token appended, never re-tokenized as joined text, so the target trains on
exactly the sequence skillhub scores and generates from. SFT gets ``input_ids`` and ``labels``
(the prompt masked: the loss covers the response only); DPO gets ``prompt_ids``, ``chosen_ids``
and ``rejected_ids``, the form TRL's own preparation produces.

TRL's GPU defaults (bf16, gradient checkpointing) are kept on a GPU and turned off on a CPU.
The weights train in float32 and are saved in float32, so the delta keeps every bit the
training produced; the pack then compresses it. No weight decay, so parameters the task never
touches keep their exact target values.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import GraftError
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.scoring.prompts import PromptFormat, Renderer

DPO_LOSSES = {"sigmoid": "sigmoid", "length-normalised": "sigmoid_norm"}  # ours -> TRL's loss_type
DEFAULT_BETA = {"sigmoid": 0.1, "length-normalised": 10.0}  # TRL's default; the paper's for LN-DPO (Table 13)


# Learning rate and epochs of each stage, by preset. ``paper``: App. F, Table 13, for 7-8B targets.
# ``small``: measured on SmolLM2-135M-Instruct (docs/grafting.md, "Presets"): at the paper's rates a
# model that small barely moves. ``auto`` picks ``small`` below SMALL_MODEL_PARAMETERS, else ``paper``.
PRESETS = {"paper": {"sft": (5e-6, 3.0), "dpo": (8e-7, 1.0)},
           "small": {"sft": (1e-4, 3.0), "dpo": (5e-6, 1.0)}}
SMALL_MODEL_PARAMETERS = 1_000_000_000


def choose_preset(preset: str, parameters: int) -> str:
    """The preset ``auto`` stands for at ``parameters``, or ``preset`` itself once checked."""
    if preset == "auto":
        return "small" if parameters < SMALL_MODEL_PARAMETERS else "paper"
    if preset not in PRESETS:
        raise GraftError(f"unknown preset {preset!r}: use auto, {', '.join(PRESETS)}")
    return preset


@dataclass(frozen=True)
class TrainingSettings:
    """One training stage: epochs (or a fixed number of optimizer steps), batch, learning rate
    (learning rate and epochs None: the preset's, see :meth:`resolved`).

    The batch of one optimizer step is ``batch_size * gradient_accumulation``. The schedule is
    cosine with 10% warm-up (the paper's, App. F).
    """

    learning_rate: float | None = None
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 8
    gradient_accumulation: int = 1
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if any(v is not None and v <= 0 for v in (self.learning_rate, self.epochs)) or self.batch_size < 1 \
                or self.gradient_accumulation < 1:
            raise GraftError("learning rate and epochs must be positive, batch size and accumulation at least 1")
        if self.steps is not None and self.steps < 1:
            raise GraftError(f"training steps must be at least 1, got {self.steps}")

    def resolved(self, preset: str, stage: str) -> TrainingSettings:
        """These settings with the learning rate and epochs left unset taken from ``PRESETS[preset][stage]``."""
        learning_rate, epochs = PRESETS[preset][stage]
        return replace(self, learning_rate=self.learning_rate or learning_rate, epochs=self.epochs or epochs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_trl() -> None:
    """Raises GraftError naming the extra to install when TRL (or its datasets) is missing."""
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise GraftError(f"grafting trains with TRL, which is not installed ({', '.join(missing)} missing): "
                         "pip install 'skillhub[graft]'")


def sft_records(renderer: Renderer, examples: list[dict[str, str]], max_length: int) -> list[dict[str, Any]]:
    """``{"input_ids", "labels"}`` of each prompt + completion, cut to ``max_length`` tokens."""
    records = []
    for example in examples:
        ids, labels = renderer.example(example["prompt"], example["completion"])
        records.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return records


def dpo_records(renderer: Renderer, pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of each preference pair."""
    return [{"prompt_ids": renderer.prompt_ids(p["prompt"]), "chosen_ids": renderer.answer_ids(p["chosen"]),
             "rejected_ids": renderer.answer_ids(p["rejected"])} for p in pairs]


def _common_config(settings: TrainingSettings, scratch: Path) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    return {
        "output_dir": str(scratch), "learning_rate": settings.learning_rate, "num_train_epochs": settings.epochs,
        "max_steps": settings.steps or -1, "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": settings.seed,
        "max_length": settings.max_length,
        # TRL's defaults assume a GPU: bf16 and gradient checkpointing. On a CPU both only cost time.
        "bf16": gpu and torch.cuda.is_bf16_supported(), "gradient_checkpointing": gpu, "use_cpu": not gpu,
        "report_to": "none", "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True,
    }


def _progress_callback(stage: str, progress: ProgressCallback):
    from transformers import TrainerCallback

    class Reporting(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(stage, state.global_step, state.max_steps)

    return Reporting()


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from transformers or datasets while TRL prepares and trains (the CLI draws its own)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    datasets_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's own bars (reference log-probs) read it
    try:
        with quiet_transformers(), warnings.catch_warnings():
            # TRL still sets transformers' renamed `gradient_checkpointing`; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
            yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()
        if tqdm_disable is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def _fit(stage: str, model_dir: Path, output: Path, build, progress: ProgressCallback) -> Path:
    """Load the model, train it with the TRL trainer ``build(model, tokenizer, scratch, callbacks)``
    makes, and save it as ``output``. TRL's own log printing is removed: library code never prints."""
    from transformers import PrinterCallback

    model, tokenizer = _load(model_dir)
    scratch = output.with_name(output.name + ".trainer")
    with _quiet():
        trainer = build(model, tokenizer, scratch, [_progress_callback(stage, progress)])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    return _save(trainer, tokenizer, output)


def _save(trainer, tokenizer, output: Path) -> Path:
    """Save the trained model as ``output`` (written under a temporary name, then renamed)."""
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        trainer.save_model(str(staging))
    tokenizer.save_pretrained(staging)
    staging.rename(output)
    return output


def supervised_finetune(model_dir: str | os.PathLike[str], examples: list[dict[str, str]],
                        output: str | os.PathLike[str], settings: TrainingSettings, *,
                        prompt_format: PromptFormat = PromptFormat(),
                        progress: ProgressCallback = no_progress) -> Path:
    """Fully fine-tune the model in ``model_dir`` on ``{"prompt", "completion"}`` examples (SFT),
    rendered in ``prompt_format``.

    Returns:
        ``output``, a Hugging Face model directory (config, safetensors, tokenizer).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def build(model, tokenizer, scratch: Path, callbacks: list) -> SFTTrainer:
        config = SFTConfig(**_common_config(settings, scratch), completion_only_loss=True, packing=False,
                           dataset_num_proc=None)
        records = sft_records(Renderer(tokenizer, prompt_format, what="the target"), examples, settings.max_length)
        return SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                          train_dataset=Dataset.from_list(records))

    return _fit("sft", Path(model_dir), Path(output), build, progress)


def preference_optimize(model_dir: str | os.PathLike[str], pairs: list[dict[str, str]],
                        output: str | os.PathLike[str], settings: TrainingSettings, *, loss: str, beta: float,
                        prompt_format: PromptFormat = PromptFormat(),
                        progress: ProgressCallback = no_progress) -> Path:
    """DPO of the model in ``model_dir`` (also the frozen reference) on ``{"prompt", "chosen", "rejected"}``.

    The reference log-probabilities are computed once before training, so only one copy of the
    model is held while it trains.

    Args:
        loss: ``sigmoid`` (DPO, Eq. 2 of the paper) or ``length-normalised`` (LN-DPO: the
            log-ratios divided by the response lengths, TRL's ``sigmoid_norm``).
        beta: DPO's β.
        prompt_format: How the pairs' prompts are rendered.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if loss not in DPO_LOSSES:
        raise GraftError(f"unknown DPO loss {loss!r}: use one of {', '.join(DPO_LOSSES)}")

    class TokenizedDPOTrainer(DPOTrainer):
        """DPO on records skillhub tokenized itself (TRL would tokenize prompt + response as joined text)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    def build(model, tokenizer, scratch: Path, callbacks: list) -> DPOTrainer:
        config = DPOConfig(**_common_config(settings, scratch), loss_type=[DPO_LOSSES[loss]], beta=beta,
                           precompute_ref_log_probs=True, dataset_num_proc=None)
        records = dpo_records(Renderer(tokenizer, prompt_format, what="the target"), pairs)
        return TokenizedDPOTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                                   train_dataset=Dataset.from_list(records))

    return _fit("dpo", Path(model_dir), Path(output), build, progress)
