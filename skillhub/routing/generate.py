"""Generation with packs chosen per prompt: by task, by explicit ids, or by the router (Eq. 9, routed).

The base model is loaded once. Prompts are grouped by the pack set they get; each set is
patched in place (exactly: :class:`skillhub.activation.Patcher`) and its prompts generated
greedily in one left-padded batch. Router features are taken with the base weights lent
back for the moment, so routing never sees a patched model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from skillhub.activation import Patcher
from skillhub.errors import RegistryError, SkillhubError
from skillhub.pack.format import SkillPack
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.front import Registry
from skillhub.registry.results import Result
from skillhub.routing.router import Decision, Router
from skillhub.routing.training import load_router
from skillhub.scoring.generation import generate_answers
from skillhub.scoring.prompts import PromptFormat, Renderer, check_context


@dataclass(frozen=True)
class Generation(Result):
    """One prompt's answer and how it was produced."""

    prompt: str
    output: str
    task: str | None  # the task whose packs answered (routed, or as asked); None: the base model
    packs: tuple[str, ...]
    probability: float | None  # the router's probability for its choice (None when not routed)
    abstained: bool = False  # routed, but no class was sure enough: the base answered


class Generator:
    """Generates answers with the right packs, loading the base once.

    Args:
        registry: The registry.
        base: Registered base name (needed when there are several).
        base_location: Where the base weights are (default: recorded at add).
        max_new_tokens: Most tokens generated per answer.
        allow_stale: Route with a stale router among the classes it knows.
        prompt_format: How prompts are rendered (default: a task's own format with ``task``, the
            router's with ``route``, else the base tokenizer's default).
        cache_sets: How many pack sets stay computed for switching back (memory: the
            parameters a set changes, each).
        device: Where the model runs (``cuda``, ``cuda:1``...; default: where transformers loads it, the CPU).

    Use it as ``gen.generate(prompts, route=True)``, or call ``gen(prompt, task=T)`` in a loop.
    """

    def __init__(self, registry: Registry, *, base: str | None = None, base_location: str | None = None,
                 max_new_tokens: int = 32, allow_stale: bool = False, prompt_format: PromptFormat | None = None,
                 cache_sets: int = 2, device: str | None = None) -> None:
        if max_new_tokens < 1:
            raise SkillhubError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
        self.registry, self.base = registry, base
        self.max_new_tokens, self.allow_stale, self.prompt_format = max_new_tokens, allow_stale, prompt_format
        self.model, self.tokenizer, self.base_entry = registry.load_base_model(base=base, location=base_location)
        if device is not None:
            self.model.to(device)
        self.patcher = Patcher(self.model, cache_sets=cache_sets)
        self._opened: dict[str, SkillPack] = {}
        self._renderers: dict[PromptFormat, Renderer] = {}
        self.version = -1
        self.refresh()

    def refresh(self) -> bool:
        """Read the lineage again (active packs, activation sets, prompt formats, router) if it changed
        since it was last read, e.g. by another process; returns whether it had. A removed pack is
        then never chosen again, and a retrained router is loaded on its next use."""
        version = self.registry.last_event(base=self.base)
        if version == self.version:
            return False
        self.version = version
        self.active = [p.id for p in self.registry.list_packs(base=self.base)]
        tasks = self.registry.tasks(base=self.base)
        self.task_sets = {t.name: list(t.packs) for t in tasks}
        self.task_formats = {t.name: t.prompt_format for t in tasks}
        self._router: Router | None = None
        self._opened = {i: pack for i, pack in self._opened.items() if i in self.active}
        return True

    # ------------------------------------------------------------------ choosing packs

    @property
    def router(self) -> Router:
        """The base's router, checked against the lineage (loaded on first use)."""
        if self._router is None:
            if not self.active:
                raise RegistryError(f"base {self.base_entry.name} has no active packs to route to: add packs first")
            router = load_router(self.registry, base=self.base)  # checked against the registered base
            router.check_usable(self.active, self.task_sets, allow_stale=self.allow_stale)
            self._router = router
        return self._router

    def decide(self, prompts: Sequence[str], *, task: str | None = None, packs: Sequence[str] | None = None,
               route: bool = False) -> list[Decision]:
        """The pack set of each prompt: the task's, the given ids, or the router's choice."""
        if sum([task is not None, packs is not None, route]) != 1:
            raise SkillhubError("choose the packs one way: a task, a list of packs, or routing")
        if route:
            router = self.router
            with self.patcher.base_weights():
                return router.route_prompts(self.model, self.tokenizer, prompts, active_packs=self.active)
        ids = tuple(self.registry.activation_ids(task=task, packs=packs, base=self.base))
        return [Decision(task=task, packs=ids, probability=None) for _ in prompts]

    def renderer(self, *, task: str | None = None, route: bool = False,
                 prompt_format: PromptFormat | None = None) -> Renderer:
        """How prompts are rendered: ``prompt_format``, else the generator's own, else the router's
        format when routing, the task's own format for a task, the base tokenizer's default otherwise.
        One renderer per format is kept: making one renders the chat template (a server asks per request)."""
        chosen = prompt_format or self.prompt_format
        if chosen is None:
            chosen = (self.router.prompt_format if route
                      else self.task_formats.get(task, PromptFormat()) if task is not None else PromptFormat())
        if chosen not in self._renderers:
            self._renderers[chosen] = Renderer(self.tokenizer, chosen, what=f"base {self.base_entry.name}")
        return self._renderers[chosen]

    def opened(self, ids: Sequence[str]) -> list[SkillPack]:
        """The opened packs of these full ids (kept open for the next time)."""
        missing = [i for i in ids if i not in self._opened]
        if missing:
            self._opened.update(self.registry.packs_by_id(missing, base=self.base))
        return [self._opened[i] for i in ids]

    # ------------------------------------------------------------------ generating

    def generate(self, prompts: Sequence[str], *, task: str | None = None, packs: Sequence[str] | None = None,
                 route: bool = False, batch_size: int = 16,
                 progress: ProgressCallback = no_progress) -> list[Generation]:
        """Answer every prompt (in order) with its pack set.

        Raises:
            SkillhubError: A prompt does not fit the model's context with max_new_tokens;
                the router is missing, stale or for another base; unknown task or packs.
        """
        prompts = list(prompts)
        renderer = self.renderer(task=task, route=route)
        encoded = [renderer.prompt_ids(p) for p in prompts]
        for ids, prompt in zip(encoded, prompts):
            check_context(self.model, ids, prompt, room=self.max_new_tokens)
        decisions = self.decide(prompts, task=task, packs=packs, route=route)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, decision in enumerate(decisions):
            groups.setdefault(decision.packs, []).append(i)
        outputs: list[str] = [""] * len(prompts)
        done = 0
        for pack_ids, members in groups.items():
            self.patcher.use(self.opened(pack_ids))
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                answers = generate_answers(self.model, renderer, [encoded[i] for i in chunk],
                                           max_new_tokens=self.max_new_tokens)
                for i, ids in zip(chunk, answers):
                    outputs[i] = renderer.decode(ids)
                done += len(chunk)
                progress("generate", done, len(prompts))
        return [Generation(prompt=p, output=o, task=d.task, packs=d.packs,
                           probability=d.probability if route else None, abstained=d.abstained)
                for p, o, d in zip(prompts, outputs, decisions)]

    def __call__(self, prompt: str, **choice) -> Generation:
        """One prompt: ``gen(prompt, route=True)``; the last pack set stays patched for the next call."""
        return self.generate([prompt], **choice)[0]

    def stream(self, prompts: Iterable[str], **choice) -> Iterator[Generation]:
        """Answer prompts one at a time as they come (e.g. from a file or a queue)."""
        for prompt in prompts:
            yield self(prompt, **choice)

    def close(self) -> None:
        """Put the base weights back in the model."""
        self.patcher.restore()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
