"""Calibration: the inputs x of every matrix a layer applies, summarised as Hessians H = 2/n X^T X.

Activations come from the *tuned* model, the model a pack should reproduce, on its real forward
pass: one plain pass records the arguments the model gives each decoder layer (masks and rotary
embeddings differ between sliding and full attention layers), then decoder layers run one at a
time, each over every calibration window with its own arguments. Inputs are caught where torch
applies a parameter as a linear map, so routers and fused 3-D experts (one slice per expert) are
seen as well as nn.Linear. Only one layer's Hessians exist at any moment; the caller consumes
them (compresses that layer) before the next layer runs. Statistics are keyed by checkpoint name.
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
from torch.overrides import TorchFunctionMode

from skillhub.errors import CalibrationError
from skillhub.io.jsonio import MAX_TEXT_BYTES, parse_json, read_regular
from skillhub.operators import LayerStatistics
from skillhub.progress import quiet_transformers
from skillhub.io.layout import CheckpointLayout

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


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise CalibrationError(f"cannot find the {count} decoder layers of {type(model).__name__}")


# torch functions through which a parameter acts as a linear map on activations. For each, where
# the weight is and which of its axes meets the input's last axis: F.linear(x, W) multiplies by
# W's last axis (nn.Linear, routers); x @ W, mm and addmm by W's first (GPT-2's Conv1D, GPT-OSS's
# experts). Catching the functions, not modules, also sees parameters outside nn.Linear: fused
# 3-D experts used one slice per expert, routers in their own module classes.
_LINEAR_MAPS: dict[str, tuple[int, int]] = {  # name -> (argument index of the weight, its input axis)
    "linear": (1, -1), "matmul": (1, -2), "__matmul__": (1, -2), "mm": (1, -2), "addmm": (2, -2),
}


@dataclass(frozen=True)
class _Use:
    """One parameter used as a linear map: which slice (expert) of it, and which axis meets x."""

    parameter: str
    expert: int | None  # index along dim 0 of a 3-D parameter, None for a 2-D one
    input_axis: int  # 0 or 1, of the (slice's) matrix


class _InputStatistics(TorchFunctionMode):
    """Accumulates 2/n X^T X (float64) of the inputs every tracked parameter is applied to."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        super().__init__()
        self._parameters = [(name, p) for name, p in parameters.items() if p.dim() in (2, 3)]
        self.sums: dict[_Use, torch.Tensor] = {}
        self.counts: dict[_Use, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = _LINEAR_MAPS.get(getattr(func, "__name__", ""))
        if where is not None and len(args) > where[0]:
            weight, x = args[where[0]], args[where[0] - 1]
            use = self._use(weight, where[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
            if use is not None and isinstance(x, torch.Tensor):
                x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                product = x.T @ x
                self.sums[use] = self.sums[use] + product if use in self.sums else product
                self.counts[use] = self.counts.get(use, 0) + x.shape[0]
        return func(*args, **kwargs)

    def _use(self, weight: torch.Tensor, input_axis: int) -> _Use | None:
        """The tracked parameter (or expert slice) ``weight`` is, and the axis of it x meets."""
        for name, parameter in self._parameters:
            offset = (weight.data_ptr() - parameter.data_ptr()) // parameter.element_size()
            expert, shape, strides = None, parameter.shape, parameter.stride()
            if parameter.dim() == 3:  # one expert's matrix, a slice along dim 0
                expert, offset = divmod(offset, parameter.stride(0))
                shape, strides = parameter.shape[1:], parameter.stride()[1:]
                if not 0 <= expert < parameter.shape[0]:
                    continue
            if offset != 0:
                continue
            if weight.shape == shape and weight.stride() == strides:
                return _Use(name, expert, input_axis % 2)
            if weight.shape == shape[::-1] and weight.stride() == strides[::-1]:  # a transposed view, W.T
                return _Use(name, expert, 1 - input_axis % 2)
        return None

    def statistics(self) -> dict[_Use, LayerStatistics]:
        return {use: LayerStatistics(hessian=(2.0 / self.counts[use]) * total, samples=self.counts[use],
                                     transposed=use.input_axis == 0)
                for use, total in self.sums.items()}


def _as_saved(layout: CheckpointLayout, statistics: dict[_Use, LayerStatistics]) -> dict[str, LayerStatistics]:
    """The statistics of each checkpoint tensor, from those of the in-memory parameters holding them.

    A checkpoint matrix that is a whole 2-D parameter takes its statistics as they are; experts
    saved as one 3-D tensor (GPT-OSS) take one Hessian per expert, stacked (an expert no token
    reached has zeros). One held in a fused parameter (Mixtral's experts.3.w1 in
    mlp.experts.gate_up_proj[3]) takes its expert's, restricted to the input features it spans;
    its orientation on disk decides ``transposed``.
    """
    by_parameter: dict[str, dict[tuple[int | None, int], LayerStatistics]] = {}
    for use, stats in statistics.items():
        by_parameter.setdefault(use.parameter, {})[(use.expert, use.input_axis)] = stats
    found: dict[str, LayerStatistics] = {}
    for parameter, uses in by_parameter.items():
        shape = layout.parameters[parameter].shape
        if parameter not in layout.whole:
            for name, index in layout.indices(parameter).items():
                saved = _fused_part(index.long(), shape, uses)
                if saved is not None:
                    found[name] = saved
        elif len(shape) == 2 and len(uses) == 1:
            found[layout.whole[parameter]] = next(iter(uses.values()))
        elif len(shape) == 3 and len({axis for _, axis in uses}) == 1:
            found[layout.whole[parameter]] = _stacked(uses, experts=shape[0])
    return found


def _stacked(uses: dict[tuple[int | None, int], LayerStatistics], *, experts: int) -> LayerStatistics:
    """One (experts, in, in) Hessian for experts saved as a 3-D tensor."""
    first = next(iter(uses.values()))
    hessian = torch.zeros((experts, *first.hessian.shape), dtype=first.hessian.dtype, device=first.hessian.device)
    for (expert, _), stats in uses.items():
        hessian[expert] = stats.hessian
    return LayerStatistics(hessian=hessian, samples=sum(stats.samples for stats in uses.values()),
                           transposed=first.transposed)


def _fused_part(index: torch.Tensor, shape: torch.Size, uses: dict[tuple[int | None, int], LayerStatistics]
                ) -> LayerStatistics | None:
    """Statistics of the checkpoint matrix whose elements sit at flat ``index`` in a fused parameter."""
    if index.dim() != 2:
        return None
    if len(shape) == 3:
        experts = torch.div(index, shape[1] * shape[2], rounding_mode="floor")
        if not torch.all(experts == experts[0, 0]):
            return None
        expert, index = int(experts[0, 0]), index % (shape[1] * shape[2])
    else:
        expert = None
    rows, columns = torch.div(index, shape[-1], rounding_mode="floor"), index % shape[-1]
    for (used_expert, axis), stats in uses.items():
        if used_expert != expert:
            continue
        feature = columns if axis == 1 else rows  # the input feature each saved element multiplies
        if torch.all(feature == feature[:1]):  # it changes along the saved matrix's columns: stored (out, in)
            along, transposed = feature[0], False
        elif torch.all(feature == feature[:, :1]):  # along its rows: stored (in, out)
            along, transposed = feature[:, 0], True
        else:
            continue
        return LayerStatistics(hessian=stats.hessian[along][:, along], samples=stats.samples, transposed=transposed)
    return None


def capture_statistics(
    model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8
) -> Iterator[tuple[int | None, dict[str, LayerStatistics]]]:
    """Yield ``(layer index, {checkpoint name: statistics})`` for layer 0, 1, ... and finally
    ``(None, ...)`` for matrices outside the decoder layers (the output head).

    One plain forward pass over the windows records, for every decoder layer, the extra arguments
    the model gives it (its attention mask, its rotary embeddings: they differ between sliding and
    full attention layers in Gemma 2/3 and GPT-OSS), and the head's statistics. Then the layers run
    again one at a time, each over every window with its own arguments, so that only one layer's
    Hessians exist at any moment. Names are the checkpoint's, as saved (see :mod:`skillhub.io.layout`).

    Args:
        model: A causal LM from :func:`load_for_calibration`, on the device to compute on.
        calibration: Token windows.
        batch_size: Windows per forward call.
    """
    model.eval()
    layout = CheckpointLayout(model)
    device = next(model.parameters()).device
    layers = _decoder_layers(model)
    layer_prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    batches = list(calibration.input_ids.to(device).split(batch_size))
    parameters = layout.parameters
    outside = {name: p for name, p in parameters.items() if not name.startswith(layer_prefix)}
    first_inputs: list[torch.Tensor] = []
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layers]

    def record(index: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # Hidden states are kept for layer 0 only: the replay makes every later layer's.
            if index == 0:
                first_inputs.append(_hidden_states(args, kwargs))
            calls[index].append(_with_hidden(args, kwargs, None))
        return hook

    # Grad mode is process state: a generator suspended inside `with torch.no_grad()` would
    # leave autograd off for its caller, so no-grad scopes never span a yield.
    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), _InputStatistics(outside) as head:
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    head_statistics = _as_saved(layout, head.statistics())

    hidden = first_inputs
    for index, layer in enumerate(layers):
        prefix = f"{layer_prefix}{index}."
        mine = {name: p for name, p in parameters.items() if name.startswith(prefix)}
        outputs = []
        with torch.no_grad(), _InputStatistics(mine) as inputs:
            for x, (args, kwargs) in zip(hidden, calls[index]):
                args, kwargs = _with_hidden(args, kwargs, x)
                outputs.append(_output(layer(*args, **kwargs)))
        hidden, calls[index] = outputs, []
        yield index, _as_saved(layout, inputs.statistics())
    yield None, head_statistics


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor | None
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A decoder layer's call with other hidden states, passed as the model passed them (first or by name)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def load_for_calibration(model_dir: str | os.PathLike[str], *, device: str) -> torch.nn.Module:
    """The tuned model in float32 on ``device``, for :func:`capture_statistics`.

    MoE experts run one expert at a time ("eager"), so each expert's inputs are seen on their own.
    """
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     experts_implementation="eager")
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
