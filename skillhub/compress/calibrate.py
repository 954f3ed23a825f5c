"""Calibration: the inputs x of every linear layer, summarised as Hessians H = 2/n X^T X.

Activations come from the *tuned* model, the model a pack should reproduce. They are
captured on its real forward pass: the inputs of the first decoder layer (hidden states,
causal mask, rotary position embeddings, exactly as the model computes them) are caught
once, then decoder layers run one at a time, each over every calibration window, with
forward hooks on its linear modules. Only one layer's Hessians exist at any moment; the
caller consumes them (compresses that layer) before the next layer runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import CalibrationError
from skillhub.io.jsonio import MAX_TEXT_BYTES, parse_json, read_regular
from skillhub.operators import LayerStatistics
from skillhub.progress import quiet_transformers
from skillhub.compress.roles import is_transposed

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer a parameter belongs to (``model.layers.3.mlp...`` -> 3), None outside layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows to run through the model, and where they came from (for the manifest)."""

    input_ids: torch.Tensor  # (samples, seqlen)
    source: dict[str, Any]


def read_calibration_texts(path: str | os.PathLike[str]) -> list[str]:
    """Texts of a calibration file: JSONL with ``text`` or ``prompt`` (+ ``answer``), or plain text.

    Raises:
        CalibrationError: The file is missing, empty, or a JSONL line has no usable field.
    """
    path = Path(path)
    what = f"calibration file {path}"
    try:
        content = read_regular(path, what=what, error=CalibrationError, max_bytes=MAX_TEXT_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    lines = [line for line in content.splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"calibration file {path} is empty")
    try:
        first = json.loads(lines[0])  # only to tell JSONL from plain text; every line is checked below
    except RecursionError as exc:
        raise CalibrationError(f"{what} line 1 is nested too deeply to be a calibration record") from exc
    except ValueError:
        first = None
    if not isinstance(first, dict):
        return [content]  # plain text: one stream, cut into windows later
    texts = []
    for number, line in enumerate(lines, start=1):
        record = parse_json(line, what=f"{what} line {number}", error=CalibrationError)
        text = record.get("text") if isinstance(record, dict) else None
        if text is None and isinstance(record, dict) and "prompt" in record:
            text = str(record["prompt"]) + str(record.get("answer", ""))
        if not isinstance(text, str) or not text:
            raise CalibrationError(
                f"calibration file {path} line {number} has no usable 'text' or 'prompt' field"
            )
        texts.append(text)
    return texts


def build_calibration_set(path: str | os.PathLike[str], tokenizer: Any, *, samples: int, seqlen: int) -> CalibrationSet:
    """Tokenize a calibration file into ``samples`` windows of ``seqlen`` tokens.

    Texts are joined into one stream (each wrapped in bos/eos) and cut into consecutive
    windows, so no window holds padding.

    Raises:
        CalibrationError: The file yields fewer than ``samples * seqlen`` tokens.
    """
    if samples < 1 or seqlen < 2:
        raise CalibrationError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    stream = _token_stream(path, tokenizer)
    needed = samples * seqlen
    if len(stream) < needed:
        raise CalibrationError(
            f"calibration file {path} yields {len(stream)} tokens but {samples} samples x {seqlen} tokens "
            f"need {needed}: give more text or lower --calib-samples/--calib-seqlen"
        )
    input_ids = torch.tensor(stream[:needed]).reshape(samples, seqlen)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return CalibrationSet(
        input_ids=input_ids,
        source={"file": Path(path).name, "sha256": digest, "samples": samples, "seqlen": seqlen},
    )


def _token_stream(path: str | os.PathLike[str], tokenizer: Any) -> list[int]:
    stream: list[int] = []
    for text in read_calibration_texts(path):
        stream.extend(_wrap(tokenizer, tokenizer.encode(text, add_special_tokens=False)))
    return stream


def fit_windows(path: str | os.PathLike[str], tokenizer: Any, *, samples: int, seqlen: int) -> tuple[int, int]:
    """(samples, seqlen) shrunk to what the file holds: fewer windows first, then shorter ones.

    For calibration text skillhub generated itself (a graft's responses), where asking the user
    for more text makes no sense.
    """
    tokens = len(_token_stream(path, tokenizer))
    seqlen = max(2, min(seqlen, tokens))
    return max(1, min(samples, tokens // seqlen)), seqlen


def _wrap(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos + ids + eos


class _StopForward(Exception):
    """Raised by the hook that catches the first decoder layer's inputs."""


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise CalibrationError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _linear_modules(root: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """Linear-like submodules (nn.Linear, GPT-2's Conv1D) keyed by their weight's parameter name."""
    found = {}
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and weight is not None):
            found[f"{prefix}{name}.weight" if name else f"{prefix}weight"] = module
    return found


class _HessianHooks:
    """Forward pre-hooks that accumulate 2/n X^T X (float64) for each hooked module."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def accumulate(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            product = x.T @ x
            self.sums[name] = self.sums[name] + product if name in self.sums else product
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return accumulate

    def close(self, *, model_type: str | None) -> dict[str, LayerStatistics]:
        for handle in self._handles:
            handle.remove()
        return {
            name: LayerStatistics(
                hessian=(2.0 / self.counts[name]) * total,
                samples=self.counts[name],
                transposed=is_transposed(name, model_type=model_type),
            )
            for name, total in self.sums.items()
        }


def capture_statistics(
    model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8
) -> Iterator[tuple[int | None, dict[str, LayerStatistics]]]:
    """Yield ``(layer index, {parameter name: statistics})`` for layer 0, 1, ... and finally
    ``(None, ...)`` for linear modules outside the decoder layers (the output head).

    Args:
        model: A loaded ``transformers`` causal LM (eval mode), on the device to compute on.
        calibration: Token windows.
        batch_size: Windows per forward call.
    """
    model.eval()
    model_type = getattr(model.config, "model_type", None)
    device = next(model.parameters()).device
    layers = _decoder_layers(model)
    layer_prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    batches = list(calibration.input_ids.to(device).split(batch_size))

    # Linear modules outside the decoder layers (the head) see the final hidden states.
    outside = {
        name: module for name, module in _linear_modules(model, "").items() if not name.startswith(layer_prefix)
    }
    caught: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def catch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caught.append((args, kwargs))
        raise _StopForward

    # Grad mode is process state: a generator suspended inside `with torch.no_grad()` would
    # leave autograd off for its caller, so no-grad scopes never span a yield.
    with torch.no_grad():
        head_hooks = _HessianHooks(outside)
        for batch in batches:
            model(input_ids=batch, use_cache=False)
        head_statistics = head_hooks.close(model_type=model_type)

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    for index, layer in enumerate(layers):
        hooks = _HessianHooks(_linear_modules(layer, f"{layer_prefix}{index}."))
        outputs = []
        with torch.no_grad():
            for args, kwargs in caught:
                result = layer(*args, **kwargs)
                hidden = result[0] if isinstance(result, tuple) else result
                outputs.append(((hidden, *args[1:]), kwargs))
        caught = outputs
        yield index, hooks.close(model_type=model_type)
    yield None, head_statistics


def load_for_calibration(model_dir: str | os.PathLike[str], *, device: str) -> torch.nn.Module:
    """The tuned model in float32 on ``device``, for :func:`capture_statistics`."""
    from transformers import AutoModelForCausalLM


    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


class StatisticsCursor:
    """Hands out each parameter's statistics while advancing :func:`capture_statistics` lazily.

    Parameters must be asked for in layer order (see :func:`layer_order`); asking for a later
    layer drops the Hessians of the earlier ones, so memory holds one layer at a time.
    """

    def __init__(self, statistics: Iterator[tuple[int | None, dict[str, LayerStatistics]]]) -> None:
        self._statistics = statistics
        self._layer: int | None = -1
        self._current: dict[str, LayerStatistics] = {}
        self._done = False

    def get(self, name: str) -> LayerStatistics | None:
        """Statistics of ``name``'s input, or None for parameters that are not linear weights."""
        wanted = layer_index(name)
        while not self._done and self._layer != wanted:
            try:
                self._layer, self._current = next(self._statistics)
            except StopIteration:
                self._done, self._current = True, {}
        return self._current.get(name) if self._layer == wanted else None


def layer_order(names: list[str]) -> list[str]:
    """Parameter names by decoder layer (0, 1, ... 10, 11), then everything outside the layers."""
    return sorted(names, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
