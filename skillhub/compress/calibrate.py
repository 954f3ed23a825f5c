"""Calibration: the inputs x of every matrix a layer applies, summarised as Hessians H = 2/n X^T X.

Activations come from the *tuned* model, the model a pack should reproduce, on its real forward
pass, with memory flat in the model's size (:class:`skillhub.io.lazy_model.LazyModel`): the model
is built without weights; one stubbed pass records the arguments the model gives each decoder layer
(masks and rotary embeddings differ between sliding and full attention layers), then decoder layers
are read from the checkpoint, run over every calibration window with their own arguments, and
released, one at a time. Inputs are caught where torch applies a parameter as a linear map, so
routers and fused 3-D experts (one slice per expert) are seen as well as nn.Linear. Only one
layer's Hessians exist at any moment; the caller consumes them (compresses that layer) before the
next layer runs. Statistics are keyed by checkpoint name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from skillhub.compress.windows import CalibrationSet
from skillhub.errors import CalibrationError
from skillhub.io.checkpoint import Checkpoint
from skillhub.io.layout import CheckpointLayout
from skillhub.io.lazy_model import LazyModel
from skillhub.operators import LayerStatistics
from skillhub.progress import ProgressCallback, no_progress

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer a parameter belongs to (``model.layers.3.mlp...`` -> 3), None outside layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def check_activation_memory(config: dict[str, Any], *, samples: int, seqlen: int) -> None:
    """Refuse a calibration set whose activations cannot be held: a layer's inputs and outputs for
    every window, in float32, must fit in half the memory available now (the layer itself, its
    Hessians and the compression need the rest).

    Raises:
        CalibrationError: Naming what it needs, what there is, and what to lower.
    """
    import psutil

    text = config.get("text_config") or {}
    width = config.get("hidden_size") or config.get("n_embd") or text.get("hidden_size") or 0
    needed = 2 * samples * seqlen * width * 4
    available = psutil.virtual_memory().available
    if needed > available / 2:
        raise CalibrationError(
            f"calibration activations need {needed / 2**30:.1f} GiB ({samples} windows x {seqlen} tokens x "
            f"{width} features, float32, a layer's inputs and outputs) but {available / 2**30:.1f} GiB of memory "
            "is available: lower --calib-samples or --calib-seqlen"
        )


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


_CASTS = ("to", "type", "float")  # Tensor methods that copy a parameter into another dtype


@dataclass(frozen=True)
class _Use:
    """One parameter used as a linear map: which slice (expert) of it, and which axis meets x."""

    parameter: str
    expert: int | None  # index along dim 0 of a 3-D parameter, None for a 2-D one
    input_axis: int  # 0 or 1, of the (slice's) matrix


class _InputStatistics(TorchFunctionMode):
    """Accumulates X^T X of the inputs every tracked parameter is applied to, in float32 (as GPTQ's
    reference does: a 14336-wide Hessian is 822 MB so, twice that in float64). Matrices applied to
    the same input tensor (q, k and v; gate and up) share one sum while they keep seeing the same
    inputs. A tracked weight left on the meta device (an unread output head) is applied on meta:
    only its input is wanted."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        super().__init__()
        self._parameters = [(name, p) for name, p in parameters.items() if p.dim() in (2, 3)]
        self.sums: dict[_Use, torch.Tensor] = {}
        self.counts: dict[_Use, int] = {}
        self._inputs: list[tuple[torch.Tensor, _Use]] = []  # this batch's inputs, each with its first use
        self._casts: list[tuple[str, torch.Tensor]] = []  # this batch's copies of parameters in another dtype

    def next_batch(self) -> None:
        """Forget which tensors this batch's inputs and casts were (a later batch's may reuse their memory)."""
        self._inputs.clear()
        self._casts.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _CASTS and args and isinstance(args[0], torch.Tensor):
            # A model that casts a weight itself (DeepSeek's router: weight.type(torch.float32))
            # applies the copy: it stands for the parameter.
            result = func(*args, **kwargs)
            source = next((name for name, p in self._parameters if p is args[0]), None)
            if source is not None and result is not args[0]:
                self._casts.append((source, result))
            return result
        where = _LINEAR_MAPS.get(getattr(func, "__name__", ""))
        if where is not None and len(args) > where[0]:
            weight, x = args[where[0]], args[where[0] - 1]
            use = self._use(weight, where[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
            if use is not None and isinstance(x, torch.Tensor):
                self._add(use, x)
                if weight.is_meta:
                    args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
                elif weight.dtype != x.dtype:  # read as stored (bfloat16): widened for this product only
                    args = tuple(a.to(x.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                 for a in args)
        return func(*args, **kwargs)

    def _add(self, use: _Use, x: torch.Tensor) -> None:
        rows = x.numel() // x.shape[-1]
        self.counts[use] = self.counts.get(use, 0) + rows
        first = next((u for seen, u in self._inputs if seen is x), None)
        if first is None:
            self._inputs.append((x, use))
        elif first != use:
            if use not in self.sums and self.counts[first] == self.counts[use]:
                self.sums[use] = self.sums[first]  # the same inputs since the start: one sum
                return
            if self.sums.get(use) is self.sums[first]:
                return  # added already, under the first use
        total = self.sums.get(use)
        if total is None:
            total = self.sums[use] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        elif any(other is total for key, other in self.sums.items() if key != use):
            total = self.sums[use] = total.clone()  # a shared sum whose users now see different inputs
        _accumulate_gram(total, x.detach().reshape(rows, x.shape[-1]).to(torch.float32))

    def _use(self, weight: torch.Tensor, input_axis: int) -> _Use | None:
        """The tracked parameter (or expert slice) ``weight`` is, and the axis of it x meets."""
        candidates = [*self._parameters, *self._casts]
        for name, parameter in candidates:
            if weight is parameter:
                return _Use(name, None, input_axis % 2)
        if weight.is_meta:
            return None
        for name, parameter in candidates:
            if parameter.is_meta:
                continue
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

    def take_statistics(self) -> dict[_Use, LayerStatistics]:
        """H = 2/n X^T X per use: the sums, scaled in place, handed over (this object forgets them)."""
        sums, self.sums = self.sums, {}
        scaled: set[int] = set()
        for use, total in sums.items():
            if id(total) not in scaled:
                scaled.add(id(total))
                _symmetrize(total)
                total.mul_(2.0 / self.counts[use])  # uses sharing a sum have the same count
        return {use: LayerStatistics(hessian=total, samples=self.counts[use], transposed=use.input_axis == 0)
                for use, total in sums.items()}


def _accumulate_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += x^T x, in its lower triangle only (:func:`_symmetrize` completes it).

    On the CPU this is BLAS's symmetric rank-k update (through SciPy; torch has no binding): half
    the flops of a matrix product, and the largest cost of calibration at an 8B model's MLP width.
    """
    if total.device.type != "cpu":
        total.addmm_(x.T, x)
        return
    from scipy.linalg import blas

    # Row-major x (rows, n) is column-major x^T (n, rows): syrk's C += A A^T with A = x^T. The
    # row-major total is its own column-major transpose; SciPy's upper triangle is our lower one.
    blas.ssyrk(1.0, x.numpy().T, beta=1.0, c=total.numpy().T, trans=0, lower=0, overwrite_c=1)


def _symmetrize(total: torch.Tensor, block: int = 1024) -> None:
    """Copy the lower triangle onto the upper one, in place, a block of rows at a time."""
    if total.device.type != "cpu":
        return  # accumulated whole by addmm_
    n = total.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        diagonal = total[start:stop, start:stop]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
        total[start:stop, stop:] = total[stop:, start:stop].T


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
        every = torch.equal(along, torch.arange(stats.hessian.shape[0], device=along.device))
        hessian = stats.hessian if every else stats.hessian[along][:, along]  # w1 and w3 share their expert's
        return LayerStatistics(hessian=hessian, samples=stats.samples, transposed=transposed)
    return None


def capture_statistics(
    lazy: LazyModel, calibration: CalibrationSet, *, batch_size: int | None = None,
    progress: ProgressCallback = no_progress,
) -> Iterator[tuple[int | None, dict[str, LayerStatistics]]]:
    """Yield ``(layer index, {checkpoint name: statistics})`` for layer 0, 1, ... and finally
    ``(None, ...)`` for matrices outside the decoder layers (the output head).

    Memory stays flat in the model's size: only one decoder layer's weights are read (from the
    checkpoint, by :class:`LazyModel`), only one layer's inputs and outputs and one layer's
    Hessians are held, and the input embedding is read only at the vocabulary rows the windows use.

    1. One forward pass with every decoder layer stubbed records the arguments the model gives
       each layer (its attention mask and rotary embeddings: they differ between sliding and full
       attention layers in Gemma 2/3 and GPT-OSS) and layer 0's input, then stops.
    2. Each layer is read, run over every window with its own arguments while its inputs are
       summarised, and released; its outputs are the next layer's inputs.
    3. A last pass feeds the final hidden states through the model's tail (final norm, head) with
       the layers stubbed to pass them through; the head itself is never read.

    Names are the checkpoint's, as saved (see :mod:`skillhub.io.layout`).

    Args:
        lazy: The tuned model from :func:`load_for_calibration`.
        calibration: Token windows.
        batch_size: Windows per forward call (default: about 2048 tokens' worth: a layer's
            intermediate activations near 120 MB at an 8B model's MLP width, and each stored
            bfloat16 matrix widened once per batch).
        progress: Called as ``progress("calibrate", layers done, layers)``.
    """
    model = lazy.model
    layers = _decoder_layers(model)
    layer_prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    seqlen = calibration.input_ids.shape[1]
    batches = list(calibration.input_ids.split(batch_size or max(1, _BATCH_TOKENS // seqlen)))
    outside = [name for name in lazy.names() if not name.startswith(layer_prefix)]
    vocabulary = _embedding_names(lazy)
    # Norms and position tables: read for each pass that needs them and released after it, never
    # across a yield, so that several captures can walk one model (fit and held-out halves).
    tail = [name for name in outside if name not in vocabulary]
    hidden, calls = _layer_calls(lazy, layers, batches, tail)
    returns_tuple = False
    for index, layer in enumerate(layers):
        hidden, statistics, returns_tuple = _replay(lazy, layer, f"{layer_prefix}{index}.", hidden, calls[index])
        calls[index] = []
        progress("calibrate", index + 1, len(layers))
        saved = _as_saved(lazy.layout, statistics)
        # Only `saved` holds the Hessians across the yield, and StatisticsCursor pops from
        # it: each Hessian is freed as soon as its module is encoded.
        del statistics
        yield index, saved
    yield None, _tail_statistics(lazy, layers, hidden, outside, tail, returns_tuple)


def _replay(lazy: LazyModel, layer: torch.nn.Module, prefix: str, hidden: list[torch.Tensor],
            calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
            ) -> tuple[list[torch.Tensor], dict[_Use, LayerStatistics], bool]:
    """Read one decoder layer, run it over every batch with its own arguments while its inputs
    are summarised, release it: (its outputs, its statistics, whether it returns a tuple)."""
    names = lazy.names(prefix=prefix)
    # Matrices stay as stored (bfloat16: half the memory) and are widened one product at a
    # time by _InputStatistics: the same float32 results, since widening is exact.
    lazy.materialize(names, matrices_as_stored=True)
    try:
        outputs, returns_tuple = [], False
        with torch.no_grad(), _InputStatistics({n: lazy.parameter(n) for n in names}) as inputs:
            for x, (args, kwargs) in zip(hidden, calls):
                inputs.next_batch()
                args, kwargs = _with_hidden(args, kwargs, x)
                result = layer(*args, **kwargs)
                returns_tuple = isinstance(result, tuple)
                outputs.append(_output(result))
        return outputs, inputs.take_statistics(), returns_tuple
    finally:
        lazy.release(names)


def _embedding_names(lazy: LazyModel) -> set[str]:
    """The input embedding and output head: the two vocabulary-sized matrices, never read whole."""
    modules = [lazy.model.get_input_embeddings(), lazy.model.get_output_embeddings()]
    return {name for name in lazy.names() if any(module is not None and lazy.parameter(name) is module.weight
                                                 for module in modules)}


_BATCH_TOKENS = 2048


class _Stop(Exception):
    """Raised by the last stubbed layer: nothing after the decoder layers is needed yet."""


def _layer_calls(lazy: LazyModel, layers: torch.nn.ModuleList, batches: list[torch.Tensor], tail: list[str]
                 ) -> tuple[list[torch.Tensor], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """Layer 0's input per batch, and every layer's call arguments (hidden states left out)."""
    first_inputs: list[torch.Tensor] = []
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layers]

    def stub(index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            if index == 0:
                first_inputs.append(_hidden_states(args, kwargs))
            calls[index].append(_with_hidden(args, kwargs, None))
            if index == len(layers) - 1:
                raise _Stop
            return _hidden_states(args, kwargs)
        return forward

    lazy.materialize(tail)
    try:
        with _stubbed(layers, stub), torch.no_grad():
            for batch in batches:
                try:
                    lazy.model(inputs_embeds=lazy.embed(batch), use_cache=False)
                except _Stop:
                    continue
                raise CalibrationError(f"{type(lazy.model).__name__} never called its last decoder layer")
    finally:
        lazy.release(tail)
    return first_inputs, calls


def _tail_statistics(lazy: LazyModel, layers: torch.nn.ModuleList, finals: list[torch.Tensor], outside: list[str],
                     tail: list[str], returns_tuple: bool) -> dict[str, LayerStatistics]:
    """Statistics of the matrices after the decoder layers (the head's input: the final norm's output)."""
    current: list[torch.Tensor] = []

    def stub(index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = current[0] if index == 0 else _hidden_states(args, kwargs)
            return (hidden,) if returns_tuple else hidden
        return forward

    lazy.materialize(tail)
    try:
        with (_stubbed(layers, stub), torch.no_grad(),
              _InputStatistics({n: lazy.parameter(n) for n in outside}) as inputs):
            for final in finals:
                inputs.next_batch()
                current[:] = [final]
                lazy.model(inputs_embeds=torch.zeros_like(final), use_cache=False)
    finally:
        lazy.release(tail)
    return _as_saved(lazy.layout, inputs.take_statistics())


@contextmanager
def _stubbed(layers: torch.nn.ModuleList, stub: Any) -> Iterator[None]:
    """Each layer's ``forward`` replaced by ``stub(index)`` (module attributes the model reads, such
    as a layer's attention type, stay as they are)."""
    for index, layer in enumerate(layers):
        layer.forward = stub(index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


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


def load_for_calibration(model: str | os.PathLike[str] | Checkpoint, *, device: str) -> LazyModel:
    """The tuned model for :func:`capture_statistics`: built without weights, read layer by layer
    in float32 onto ``device``."""
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
    return LazyModel(checkpoint, device=device, dtype=torch.float32)


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
        """Statistics of ``name``'s input, or None for parameters that are not linear weights.

        Each name is handed out once: the cursor lets go of it, so its Hessian is freed as soon
        as the caller has used it."""
        wanted = layer_index(name)
        while not self._done and self._layer != wanted:
            self._current = {}  # the finished layer's leftovers go before the next layer's arrive
            try:
                self._layer, self._current = next(self._statistics)
            except StopIteration:
                self._done = True
        return self._current.pop(name, None) if self._layer == wanted else None


def layer_order(names: list[str]) -> list[str]:
    """Parameter names by decoder layer (0, 1, ... 10, 11), then everything outside the layers."""
    return sorted(names, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
