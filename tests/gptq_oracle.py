"""gptqmodel 7.6.0 as an oracle for our GPTQ (test and benchmark use only; never imported at runtime).

Configured as vanilla GPTQ: gptqmodel's own defaults differ (damp 0.05 with auto-increment,
act_group_aware reordering, an RTN fallback), so each is switched off explicitly.
"""

from __future__ import annotations

import torch


def gptq_oracle(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, act_order: bool = False,
                damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [rows, cols], scales [rows, groups], zeros [rows, groups]) from gptqmodel's GPTQ."""
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.detach().clone().float()
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=False, desc_act=act_order, act_group_aware=False,
                            damp_percent=damp, damp_auto_increment=0.0, static_groups=act_order, mse=0.0,
                            fallback=None, offload_to_disk=False)
    gptq = GPTQ(linear, config)
    gptq.quantizer.configure(perchannel=True)
    gptq.H = hessian.detach().clone().float()
    gptq.nsamples = 1
    gptq._hessian_dirty = False
    dequantized, scale, zero, g_idx, *_ = gptq.quantize(blocksize=128)
    groups = g_idx.long()
    codes = torch.clamp(torch.round(dequantized / scale[:, groups]) + zero[:, groups], 0, 2**bits - 1)
    return codes.to(torch.uint8), scale, zero
