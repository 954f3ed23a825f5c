"""Where each tensor of a checkpoint lives in a model that ``transformers`` loaded.

transformers 5 renames and fuses weights on load and undoes it on save: Mixtral's per-expert
``block_sparse_moe.experts.3.w1.weight`` becomes a slice of the 3-D ``mlp.experts.gate_up_proj``,
GPT-NeoX's ``embed_out`` becomes ``lm_head``. Packs and fingerprints are keyed by the checkpoint's
names, so patching or fingerprinting a loaded model must see it as saved. No name table of ours:
transformers' own save-time conversion (``revert_weight_conversion``) is applied to one parameter
at a time. Those conversions only move elements (rename, split, stack, transpose), so reverting a
tensor of element indices tells exactly which elements of the parameter hold each checkpoint
tensor; that index map is made only for a fused parameter a pack changes, and only while it is
patched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def revert(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``tensor``, the value of the model's parameter or buffer ``name``, as the checkpoint saves it."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {name: tensor})


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model under its checkpoint name and in its checkpoint shape, one
    in-memory tensor at a time (a tied head, not a tensor of its own on disk, left out)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield from revert(model, name, tensor).items()


class CheckpointLayout:
    """Which in-memory parameter holds each checkpoint tensor of a loaded model, and where in it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.parameters = dict(model.named_parameters())
        self.owner: dict[str, str] = {}  # checkpoint name -> parameter name
        self.whole: dict[str, str] = {}  # parameter -> its checkpoint name, when it is one tensor, same shape
        for name, parameter in self.parameters.items():
            # Meta tensors: names and shapes only, nothing allocated.
            reverted = revert(model, name, torch.empty(parameter.shape, device="meta"))
            for key in reverted:
                self.owner[key] = name
            if len(reverted) == 1 and next(iter(reverted.values())).shape == parameter.shape:
                self.whole[name] = next(iter(reverted))

    def indices(self, parameter: str) -> dict[str, torch.Tensor]:
        """For each checkpoint tensor held in a fused ``parameter``: the flat indices of its
        elements in the parameter, shaped as the checkpoint tensor."""
        shape = self.parameters[parameter].shape
        dtype = torch.int32 if shape.numel() < 2**31 else torch.int64
        return revert(self.model, parameter, torch.arange(shape.numel(), dtype=dtype).reshape(shape))
