"""Our GPTQ gives gptqmodel's codes on the same matrix and Hessian (skipped where gptqmodel is absent).

Install the oracle with `pip install -c constraints.txt -e '.[oracle]'` (it pins numpy 2.2).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")

from gptq_oracle import gptq_oracle  # noqa: E402

from skillhub.numerics.gptq import gptq_quantize  # noqa: E402


def _problem(rows: int, cols: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    inputs = torch.randn(samples, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    return weight, 2 * inputs.T @ inputs / samples


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_same_codes_scales_and_zeros_as_gptqmodel(bits: int, group_size: int, act_order: bool) -> None:
    weight, hessian = _problem(64, 256, 512)
    ours = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, act_order=act_order)
    codes, scales, zeros = gptq_oracle(weight, hessian, bits=bits, group_size=group_size, act_order=act_order)
    assert torch.equal(ours.codes, codes)
    assert torch.equal(ours.zeros, zeros.to(torch.uint8))
    assert torch.equal(ours.scales, scales.to(torch.float16))
