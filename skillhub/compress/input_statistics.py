"""What calibration gathers: X^T X of the inputs every tracked parameter is applied to, caught
where torch applies it as a linear map (:class:`InputStatistics`, a ``TorchFunctionMode``), in
float32, then keyed by checkpoint name for the compressor (:func:`as_saved`), fused 3-D experts
and fused projections cut the way the checkpoint stores them. :mod:`skillhub.compress.calibrate`
runs the layers; this module only counts what they see."""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from skillhub.io.layout import CheckpointLayout
from skillhub.numerics.gptq import mirror_lower
from skillhub.operators import LayerStatistics

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
class Use:
    """One parameter used as a linear map: which slice (expert) of it, and which axis meets x."""

    parameter: str
    expert: int | None  # index along dim 0 of a 3-D parameter, None for a 2-D one
    input_axis: int  # 0 or 1, of the (slice's) matrix


class InputStatistics(TorchFunctionMode):
    """Accumulates X^T X of the inputs every tracked parameter is applied to, in float32 (as GPTQ's
    reference does: a 14336-wide Hessian is 822 MB so, twice that in float64). Matrices applied to
    the same input tensor (q, k and v; gate and up) share one sum while they keep seeing the same
    inputs. A tracked weight left on the meta device (an unread output head) is applied on meta:
    only its input is wanted."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        super().__init__()
        self._parameters = [(name, p) for name, p in parameters.items() if p.dim() in (2, 3)]
        self.sums: dict[Use, torch.Tensor] = {}
        self.counts: dict[Use, int] = {}
        self._inputs: list[tuple[torch.Tensor, Use]] = []  # this batch's inputs, each with its first use
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

    def _add(self, use: Use, x: torch.Tensor) -> None:
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

    def _use(self, weight: torch.Tensor, input_axis: int) -> Use | None:
        """The tracked parameter (or expert slice) ``weight`` is, and the axis of it x meets."""
        candidates = [*self._parameters, *self._casts]
        for name, parameter in candidates:
            if weight is parameter:
                return Use(name, None, input_axis % 2)
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
                return Use(name, expert, input_axis % 2)
            if weight.shape == shape[::-1] and weight.stride() == strides[::-1]:  # a transposed view, W.T
                return Use(name, expert, 1 - input_axis % 2)
        return None

    def take_statistics(self) -> dict[Use, LayerStatistics]:
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


def _symmetrize(total: torch.Tensor) -> None:
    """Complete the lower triangle syrk accumulated (on the CPU; ``addmm_`` fills both elsewhere)."""
    if total.device.type == "cpu":
        mirror_lower(total)


def as_saved(layout: CheckpointLayout, statistics: dict[Use, LayerStatistics],
             stored_whole: Callable[[str], str | None] | None = None) -> dict[str, LayerStatistics]:
    """The statistics of each checkpoint tensor, from those of the in-memory parameters holding them.

    ``stored_whole(parameter)`` names the checkpoint tensor holding a parameter whole (default: the
    layout's conversion map; :meth:`LazyModel.stored_whole` also knows experts fused on disk).

    A checkpoint matrix that is a whole 2-D parameter takes its statistics as they are; experts
    saved as one 3-D tensor (GPT-OSS) take one Hessian per expert, stacked (an expert no token
    reached has zeros). One held in a fused parameter (Mixtral's experts.3.w1 in
    mlp.experts.gate_up_proj[3]) takes its expert's, restricted to the input features it spans;
    its orientation on disk decides ``transposed``.
    """
    by_parameter: dict[str, dict[tuple[int | None, int], LayerStatistics]] = {}
    for use, stats in statistics.items():
        by_parameter.setdefault(use.parameter, {})[(use.expert, use.input_axis)] = stats
    stored_whole = stored_whole or layout.whole.get
    found: dict[str, LayerStatistics] = {}
    for parameter, uses in by_parameter.items():
        shape = layout.parameters[parameter].shape
        whole = stored_whole(parameter)
        if whole is None:
            for name, index in layout.indices(parameter).items():
                saved = _fused_part(index.long(), shape, uses)
                if saved is not None:
                    found[name] = saved
        elif len(shape) == 2 and len(uses) == 1:
            found[whole] = next(iter(uses.values()))
        elif len(shape) == 3 and len({axis for _, axis in uses}) == 1:
            found[whole] = _stacked(uses, experts=shape[0])
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
