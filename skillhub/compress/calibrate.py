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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from skillhub.compress.input_statistics import InputStatistics, Use, as_saved
from skillhub.compress.windows import CalibrationSet
from skillhub.errors import CalibrationError
from skillhub.io.checkpoint import Checkpoint, config_value
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

    width = config_value(config, "hidden_size", "n_embd") or 0
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
        batch_size: Windows per forward call (default: about 1024 tokens' worth: each of a
            layer's intermediate activations near 60 MB at an 8B model's MLP width, since the
            capture is a calibrated layer's highest point; each stored bfloat16 matrix is widened
            once per batch: at 8B, 4096 tokens in 4 batches took 5 s more than in 2).
        progress: Called as ``progress("calibrate", layers done, layers)``.
    """
    model = lazy.model
    layers = _decoder_layers(model)
    layer_prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    seqlen = calibration.input_ids.shape[1]
    batches = list(calibration.input_ids.split(batch_size or max(1, BATCH_TOKENS // seqlen)))
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
        saved = as_saved(lazy.layout, statistics, lazy.stored_whole)
        # Only `saved` holds the Hessians across the yield, and StatisticsCursor pops from
        # it: each Hessian is freed as soon as its module is encoded.
        del statistics
        yield index, saved
    yield None, _tail_statistics(lazy, layers, hidden, outside, tail, returns_tuple)


def _replay(lazy: LazyModel, layer: torch.nn.Module, prefix: str, hidden: list[torch.Tensor],
            calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
            ) -> tuple[list[torch.Tensor], dict[Use, LayerStatistics], bool]:
    """Read one decoder layer, run it over every batch with its own arguments while its inputs
    are summarised, release it: (its outputs, its statistics, whether it returns a tuple)."""
    names = lazy.names(prefix=prefix)
    # Matrices stay as stored (bfloat16: half the memory) and are widened one product at a
    # time by InputStatistics: the same float32 results, since widening is exact.
    lazy.materialize(names, matrices_as_stored=True)
    try:
        outputs, returns_tuple = [], False
        with torch.no_grad(), InputStatistics({n: lazy.parameter(n) for n in names}) as inputs:
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


BATCH_TOKENS = 1024


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
              InputStatistics({n: lazy.parameter(n) for n in outside}) as inputs):
            for final in finals:
                inputs.next_batch()
                current[:] = [final]
                lazy.model(inputs_embeds=torch.zeros_like(final), use_cache=False)
    finally:
        lazy.release(tail)
    return as_saved(lazy.layout, inputs.take_statistics(), lazy.stored_whole)


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
    layer drops the Hessians of the earlier ones, so memory holds one layer at a time. A Hessian
    that no other parameter of its layer shares is handed out ``exclusive``: its one reader may
    overwrite it.
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
            else:
                _mark_exclusive(self._current)
        return self._current.pop(name, None) if self._layer == wanted else None


def _mark_exclusive(statistics: dict[str, LayerStatistics]) -> None:
    """Mark ``exclusive`` the entries whose Hessian no other entry's shares storage with, in place:
    this dict is the only holder of the layer's Hessians across the generator's yield (a copy
    would keep them all alive until the next layer is captured)."""
    users = Counter(stats.hessian.untyped_storage().data_ptr() for stats in statistics.values())
    for name, stats in statistics.items():
        statistics[name] = replace(stats, exclusive=users[stats.hessian.untyped_storage().data_ptr()] == 1)


def layer_order(names: list[str]) -> list[str]:
    """Parameter names by decoder layer (0, 1, ... 10, 11), then everything outside the layers."""
    return sorted(names, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
