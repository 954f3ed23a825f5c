"""Stages 3 and 4 of a graft: full fine-tuning of the target on TRL's ``SFTTrainer``, then
``DPOTrainer`` (the only module that imports ``trl`` and ``datasets``).

Examples reach TRL as prompt/completion (SFT) and prompt/chosen/rejected (DPO) records: in
the conversational form when the target's tokenizer has a chat template, else as plain text
with the target's ``<s>`` in front when its tokenizer does not add it, the form skillhub's own
scoring feeds the model (``<s> prompt answer </s>``). The loss covers the response only.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import GraftError
from skillhub.graft.generation import needs_bos
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers

DPO_LOSSES = {"sigmoid": "sigmoid", "length-normalised": "sigmoid_norm"}  # ours -> TRL's loss_type
DEFAULT_BETA = {"sigmoid": 0.1, "length-normalised": 10.0}  # TRL's default; the paper's for LN-DPO (Table 13)


@dataclass(frozen=True)
class TrainingSettings:
    """One training stage: epochs (or a fixed number of optimizer steps), batch, learning rate.

    The batch of one optimizer step is ``batch_size * gradient_accumulation``. The schedule is
    cosine with 10% warm-up (the paper's, App. F).
    """

    learning_rate: float
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    gradient_accumulation: int = 1
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.epochs <= 0 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise GraftError("learning rate and epochs must be positive, batch size and accumulation at least 1")
        if self.steps is not None and self.steps < 1:
            raise GraftError(f"training steps must be at least 1, got {self.steps}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_trl() -> None:
    """Raises GraftError naming the extra to install when TRL (or its datasets) is missing."""
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise GraftError(f"grafting trains with TRL, which is not installed ({', '.join(missing)} missing): "
                         "pip install 'skillhub[graft]'")


def example_format(tokenizer) -> str:
    """``chat`` when the target has a chat template, else ``plain``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def _plain_prefix(tokenizer) -> str:
    """The text in front of a plain prompt: ``<s>`` when the tokenizer does not add it itself."""
    return tokenizer.bos_token if needs_bos(tokenizer) else ""


def sft_records(tokenizer, examples: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``{"prompt", "completion"}`` records in the form the target reads."""
    if example_format(tokenizer) == "chat":
        return [{"prompt": [{"role": "user", "content": e["prompt"]}],
                 "completion": [{"role": "assistant", "content": e["completion"]}]} for e in examples]
    prefix = _plain_prefix(tokenizer)
    return [{"prompt": prefix + e["prompt"], "completion": e["completion"]} for e in examples]


def dpo_records(tokenizer, pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected"}`` records in the form the target reads."""
    if example_format(tokenizer) == "chat":
        return [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    prefix = _plain_prefix(tokenizer)
    return [{"prompt": prefix + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


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
                        progress: ProgressCallback = no_progress) -> Path:
    """Fully fine-tune the model in ``model_dir`` on ``{"prompt", "completion"}`` examples (SFT).

    Returns:
        ``output``, a Hugging Face model directory (config, safetensors, tokenizer).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def build(model, tokenizer, scratch: Path, callbacks: list) -> SFTTrainer:
        config = SFTConfig(**_common_config(settings, scratch), completion_only_loss=True, packing=False,
                           dataset_num_proc=None)
        return SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                          train_dataset=Dataset.from_list(sft_records(tokenizer, examples)))

    return _fit("sft", Path(model_dir), Path(output), build, progress)


def preference_optimize(model_dir: str | os.PathLike[str], pairs: list[dict[str, str]],
                        output: str | os.PathLike[str], settings: TrainingSettings, *, loss: str, beta: float,
                        progress: ProgressCallback = no_progress) -> Path:
    """DPO of the model in ``model_dir`` (also the frozen reference) on ``{"prompt", "chosen", "rejected"}``.

    The reference log-probabilities are computed once before training, so only one copy of the
    model is held while it trains.

    Args:
        loss: ``sigmoid`` (DPO, Eq. 2 of the paper) or ``length-normalised`` (LN-DPO: the
            log-ratios divided by the response lengths, TRL's ``sigmoid_norm``).
        beta: DPO's β.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if loss not in DPO_LOSSES:
        raise GraftError(f"unknown DPO loss {loss!r}: use one of {', '.join(DPO_LOSSES)}")

    def build(model, tokenizer, scratch: Path, callbacks: list) -> DPOTrainer:
        config = DPOConfig(**_common_config(settings, scratch), loss_type=[DPO_LOSSES[loss]], beta=beta,
                           precompute_ref_log_probs=True, dataset_num_proc=None)
        return DPOTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                          train_dataset=Dataset.from_list(dpo_records(tokenizer, pairs)))

    return _fit("dpo", Path(model_dir), Path(output), build, progress)
