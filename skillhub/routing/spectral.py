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

from skillhub.scoring.interference import input_subspace
from skillhub.pack.format import SkillPack
from skillhub.routing.router import Decision, RouteClass
from skillhub.scoring.prompts import Renderer


class SpectralRouter:
    """Args: the base model (holding its base weights while it scores), the classes (those with
    packs are scored), the opened packs by id, and k."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[RouteClass], packs: dict[str, SkillPack], *,
                 rank: int = 4) -> None:
        self.model = model
        self.classes = [c for c in classes if c.packs]
        modules = dict(model.named_modules())
        self.readers: dict[str, list[tuple[str, torch.Tensor]]] = {}  # module -> (pack id, V: in x k)
        for pack_id in sorted({p for c in self.classes for p in c.packs}):
            for name, entry in packs[pack_id].modules.items():
                module = name.removesuffix(".weight")
                if len(entry.shape) == 2 and isinstance(modules.get(module), torch.nn.Linear):
                    basis = input_subspace(packs[pack_id].decode(name).float(), rank)
                    self.readers.setdefault(module, []).append((pack_id, basis))

    @torch.no_grad()
    def scores(self, renderer: Renderer, prompts: list[str]) -> torch.Tensor:
        """(N, classes) response of each class's packs to each prompt."""
        pack_ids = sorted({p for c in self.classes for p in c.packs})
        # responses[pack][prompt]: that pack's response at each module it changes
        responses: dict[str, list[list[float]]] = {p: [[] for _ in prompts] for p in pack_ids}
        modules = dict(self.model.named_modules())
        current = 0
        handles = []
        for name, readers in self.readers.items():
            def respond(_module, args, _output, readers=readers):
                tokens = args[0][0].float()  # one prompt per pass: no padding
                centered = tokens - tokens.mean(dim=0)
                energy = centered.pow(2).sum().clamp(min=1e-12)
                for pack_id, basis in readers:
                    responses[pack_id][current].append(float((centered @ basis).pow(2).sum() / energy))
            handles.append(modules[name].register_forward_hook(respond))
        device = next(self.model.parameters()).device
        try:
            for current, prompt in enumerate(prompts):
                self.model(input_ids=torch.tensor([renderer.prompt_ids(prompt)], device=device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        per_pack = {p: torch.tensor([sum(r) / len(r) if r else 0.0 for r in responses[p]]) for p in pack_ids}
        return torch.stack([torch.stack([per_pack[p] for p in c.packs]).mean(0) for c in self.classes], dim=1)

    def decide(self, renderer: Renderer, prompts: list[str]) -> list[Decision]:
        """The class with the strongest response for each prompt (its share of the responses as probability)."""
        scores = self.scores(renderer, prompts)
        shares = scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
        best, index = shares.max(dim=1)
        return [Decision(task=self.classes[i].task, packs=self.classes[i].packs, probability=p)
                for p, i in zip(best.tolist(), index.tolist())]
