"""A training-free router: each pack is scored by how strongly its stored update responds to the
prompt's activations (the idea behind PEFT's Arrow and SpectR), with no routing examples.

For every matrix a pack changes, the top-k right singular vectors V of its decoded delta span
the inputs it acts on (for an SVD pack, the span of its stored ``A`` factor). A prompt's
response is, averaged over those matrices, the fraction of the energy of the base model's
inputs to that matrix that falls in V: sum_t ||V^T x_t||^2 / sum_t ||x_t||^2 over the prompt's
tokens, each x_t taken relative to the prompt's mean input (a direction every token shares,
and every pack responds to, would otherwise drown the content). A task's score is the mean
of its packs'; the prompt goes to the task with the highest score. There is no base class:
this router always picks a task. It is reported beside the trained router by ``route eval``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skillhub.evaluation.interference import input_subspace
from skillhub.pack.format import SkillPack
from skillhub.routing.features import prompt_ids
from skillhub.routing.router import Decision, RouteClass


class SpectralRouter:
    """Args: the base model (patched weights are lent back by the caller), the classes with packs,
    the opened packs by id, and k."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[RouteClass], packs: dict[str, SkillPack], *,
                 rank: int = 4) -> None:
        self.classes = [c for c in classes if c.packs]
        modules = dict(model.named_modules())
        self.bases: dict[str, dict[str, torch.Tensor]] = {}  # pack id -> module -> V (in x k)
        for pack_id in sorted({p for c in self.classes for p in c.packs}):
            pack = packs[pack_id]
            self.bases[pack_id] = {}
            for name, entry in pack.modules.items():
                module = name.removesuffix(".weight")
                if len(entry.shape) == 2 and isinstance(modules.get(module), torch.nn.Linear):
                    self.bases[pack_id][module] = input_subspace(pack.decode(name).float(), rank)
        self.watched = sorted({m for b in self.bases.values() for m in b})
        self.model = model

    @torch.no_grad()
    def scores(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """(N, classes) response of each class's packs to each prompt."""
        inputs: dict[str, list[torch.Tensor]] = {m: [] for m in self.watched}
        modules = dict(self.model.named_modules())
        handles = []
        for name in self.watched:
            def keep(_module, args, _output, name=name):
                tokens = args[0][0].float()  # one prompt per pass: no padding
                inputs[name].append((tokens - tokens.mean(dim=0)).cpu())
            handles.append(modules[name].register_forward_hook(keep))
        device = next(self.model.parameters()).device
        try:
            for prompt in prompts:
                self.model(input_ids=torch.tensor([prompt_ids(tokenizer, prompt)], device=device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        per_pack = {}
        for pack_id, bases in self.bases.items():
            responses = [torch.stack([(x @ v.cpu()).pow(2).sum() / x.pow(2).sum().clamp(min=1e-12) for x in inputs[m]])
                         for m, v in bases.items()]
            per_pack[pack_id] = torch.stack(responses).mean(0) if responses else torch.zeros(len(prompts))
        return torch.stack([torch.stack([per_pack[p] for p in c.packs]).mean(0) for c in self.classes], dim=1)

    def decide(self, tokenizer, prompts: list[str]) -> list[Decision]:
        """The class with the strongest response for each prompt (its share of the responses as probability)."""
        scores = self.scores(tokenizer, prompts)
        shares = scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
        best, index = shares.max(dim=1)
        return [Decision(task=self.classes[i].task, packs=self.classes[i].packs, probability=p)
                for p, i in zip(best.tolist(), index.tolist())]
