"""Router features: the base model's hidden state at one layer, mean-pooled over the prompt.

The prompt is rendered as the router's prompt format says (:class:`~skillhub.scoring.prompts.Renderer`:
the chat template's user turn and generation prompt, or ``<bos>`` + prompt), as generation reads it.
Only the first ``layer`` decoder layers run: a hook stops the forward pass once that layer
has produced its output. The features depend on the base weights alone, so they stay valid
when packs are added or removed (callers patching packs in lend the base weights back, see
:meth:`skillhub.activation.Patcher.base_weights`).
"""

from __future__ import annotations

import torch

from skillhub.errors import SkillhubError
from skillhub.scoring.prompts import Renderer, check_context


class _Stop(Exception):
    """Raised by the hook on the last needed layer, carrying its output."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's list of layers (``model.model.layers`` for Llama, Qwen, Gemma, Mistral...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def layer_count(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def default_layer(model: torch.nn.Module) -> int:
    """Half-way through the decoder (see docs/routing.md for the measurement behind it)."""
    return max(1, layer_count(model) // 2)


@torch.no_grad()
def prompt_features(model: torch.nn.Module, renderer: Renderer, prompts: list[str], layer: int, *,
                    batch_size: int = 32) -> torch.Tensor:
    """(len(prompts), hidden) float32: hidden state after decoder layer ``layer`` (1-based;
    0 is the embeddings), mean-pooled over each prompt's tokens.

    Raises:
        SkillhubError: ``layer`` is out of range, or a prompt exceeds the model's context.
    """
    count = layer_count(model)
    if not 0 <= layer <= count:
        raise SkillhubError(f"--layer {layer} is out of range: the model has {count} decoder layers (0..{count})")
    encoded = []
    for prompt in prompts:
        ids = renderer.prompt_ids(prompt)
        check_context(model, ids, prompt)
        encoded.append(ids)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    pad = renderer.pad_id
    pooled = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=device)
        hidden = _hidden_at(model, layers, input_ids, mask, layer)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu())
    return torch.cat(pooled) if pooled else torch.empty(0, model.config.hidden_size)


def _hidden_at(model: torch.nn.Module, layers: torch.nn.ModuleList | None, input_ids: torch.Tensor,
               mask: torch.Tensor, layer: int) -> torch.Tensor:
    if layers is None or layer == 0:
        return model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]

    def stop(_module, _inputs, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer - 1].register_forward_hook(stop)
    try:
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    except _Stop as stopped:
        return stopped.hidden
    finally:
        handle.remove()
    raise SkillhubError(f"decoder layer {layer} never ran: cannot take router features from this model")
