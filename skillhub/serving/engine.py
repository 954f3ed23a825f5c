"""The scheduler behind ``skillhub serve``: one thread owns the model, and answers requests in
batches of one pack set at a time.

Every request becomes a :class:`Job`. The engine's thread, turn after turn:

1. reads the lineage again if another process changed it (:meth:`Generator.refresh`: one query
   when nothing changed), so packs added or removed with the CLI, and a retrained router, are
   picked up without a restart;
2. decides each new job's pack set: a task's set, the packs it names, the base, or, for ``auto``,
   the router's choice (all new ``auto`` prompts in one pass, on the base weights);
3. takes the next batch: the jobs that share the pack set (and merge, end tokens and sampling) of
   the job that has waited longest, at most ``max_batch`` of them, oldest first. So no set starves
   another: the oldest waiting job is always in the next batch. A job whose pack was removed
   since it was decided is refused then (404), never answered with it;
4. patches that set in place (exact and cached, :class:`~skillhub.activation.Patcher`) and
   generates the batch left-padded, as ``skillhub generate`` does, so a greedy answer is the same,
   token for token.

Batching is static: a job that arrives while a batch runs waits for the next one. A sampled job
with a ``seed`` runs alone, so its answer depends on its seed only.

Events go back to the job's ``deliver`` callback (from the engine's thread): :class:`Decided`
once its packs are known, :class:`Text` pieces while it generates, then :class:`Finished` or
:class:`Failed`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from skillhub.activation import Merge
from skillhub.errors import NotFoundError, RegistryError, SkillhubError
from skillhub.routing.generate import Generator
from skillhub.routing.router import Decision
from skillhub.scoring.generation import generate_answers
from skillhub.scoring.prompts import PromptFormat, Renderer, check_context
from skillhub.serving.decoding import CANCELLED, TIMEOUT, BatchStreams, Row

log = logging.getLogger(__name__)

AUTO, BASE = "auto", "base"  # the model ids that are not tasks


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedily when ``temperature`` is 0, else sampled."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def options(self) -> dict | None:
        """``generate``'s sampling options (top_k 0: OpenAI's API has no top-k)."""
        return None if self.greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class Request:
    """What a client asked, checked for shape by the HTTP layer.

    ``messages`` (a chat) or ``prompt`` (a plain completion); ``packs`` and ``merge`` are the
    request's extras: explicit pack ids instead of the model's set, and how to combine them.
    """

    model: str
    max_tokens: int
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    packs: tuple[str, ...] | None = None
    merge: Merge | None = None


@dataclass(frozen=True)
class Decided:
    decision: Decision
    prompt_tokens: int


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    reason: str  # stop | length
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    code: str


Event = Decided | Text | Finished | Failed


@dataclass(eq=False)
class Job:
    """A request inside the engine, and where its events go."""

    request: Request
    deliver: Callable[[Event], None]
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    gone: bool = False  # set by the HTTP layer when the client disconnects
    # set by the engine once decided
    renderer: Renderer | None = None
    prompt_ids: list[int] | None = None
    decision: Decision | None = None
    key: tuple = ()


def _failure(exc: SkillhubError, *, routing: bool = False) -> Failed:
    """The HTTP error of a refused job: what the client named does not exist (404), the router cannot
    route the lineage as it is now (503: a stale router is not the client's fault), or the request
    cannot be answered as asked (400)."""
    if isinstance(exc, RegistryError) and routing and not isinstance(exc, NotFoundError):
        return Failed(503, str(exc), "unavailable")
    if isinstance(exc, RegistryError):  # unknown model or pack, a pack that is no longer active
        return Failed(404, str(exc), "model_not_found")
    return Failed(400, str(exc), "invalid_request")


class Engine:
    """Runs jobs on a :class:`~skillhub.routing.generate.Generator` (see the module docstring).

    Args:
        generator: The loaded base, its patcher and the lineage it reads.
        max_batch: Most jobs generated together.
        observe: Called on the engine's thread with (what, value) for the metrics: ``batch`` (its
            size), ``switch`` / ``cache_hit`` (pack-set changes), ``routed`` (a class name),
            ``reload`` (the lineage was read again), ``tokens`` (model id, count).
    """

    def __init__(self, generator: Generator, *, max_batch: int = 8,
                 observe: Callable[[str, object], None] = lambda what, value: None) -> None:
        self.generator, self.max_batch, self.observe = generator, max_batch, observe
        self._new: list[Job] = []
        self._ready: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._unique = itertools.count()
        self._thread = threading.Thread(target=self._run, name="skillhub-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (its events come from the engine's thread)."""
        with self._wake:
            if self._stopping:
                job.deliver(Failed(503, "the server is shutting down", "unavailable"))
                return
            self._new.append(job)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._new) + len(self._ready)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread and put the base weights back."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.generator.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._new or self._ready or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._new or self._ready):
                    return
                new, self._new = self._new, []
            batch: list[Job] = new
            try:
                self._decide(new)
                batch = self._next_batch()
                if batch:
                    self._generate(batch)
            except Exception:  # noqa: BLE001 - a bug must fail its jobs, not the server
                log.exception("the engine failed on a batch")
                for job in batch:
                    job.deliver(Failed(500, "internal error while generating: see the server's log", "internal_error"))

    # ------------------------------------------------------------------ deciding

    def _decide(self, jobs: list[Job]) -> None:
        if self.generator.refresh():
            self.observe("reload", 1)
        routed: list[Job] = []
        for job in jobs:
            try:
                self._prepare(job)
                if job.request.model == AUTO:
                    routed.append(job)
                else:
                    self._admit(job, self._fixed_decision(job.request))
            except SkillhubError as exc:
                job.deliver(_failure(exc, routing=job.request.model == AUTO))
        if routed:
            texts = [self._routed_text(job.request) for job in routed]
            try:
                decisions = self.generator.decide(texts, route=True)
            except SkillhubError as exc:
                for job in routed:
                    job.deliver(_failure(exc, routing=True))
                return
            for job, decision in zip(routed, decisions):
                self.observe("routed", decision.task or BASE)
                try:
                    self._admit(job, decision)
                except SkillhubError as exc:
                    job.deliver(_failure(exc))

    def _prepare(self, job: Job) -> None:
        """The job's renderer and prompt ids, checked against the model's context."""
        request = job.request
        if request.model == AUTO:
            if request.packs is not None:
                raise SkillhubError("packs names the packs itself: use it with a task or base, not auto")
            renderer = self.generator.renderer(route=True)
        elif request.model == BASE:
            renderer = self.generator.renderer()
        elif self.generator.task_sets.get(request.model):
            renderer = self.generator.renderer(task=request.model)
        else:
            with_packs = sorted(t for t, ids in self.generator.task_sets.items() if ids)
            raise NotFoundError("model", request.model, known=[AUTO, BASE, *with_packs])
        if request.prompt is not None:  # a plain completion continues raw text, whatever the task's format
            renderer = self.generator.renderer(prompt_format=PromptFormat("plain"))
            ids = renderer.prompt_ids(request.prompt)
        else:
            ids = renderer.conversation_ids(list(request.messages or ()))
        check_context(self.generator.model, ids, self._routed_text(request), room=request.max_tokens)
        job.renderer, job.prompt_ids = renderer, ids

    @staticmethod
    def _routed_text(request: Request) -> str:
        """What the router reads: the prompt, or the chat's last user message."""
        if request.prompt is not None:
            return request.prompt
        users = [m["content"] for m in request.messages or () if m.get("role") == "user"]
        return users[-1] if users else ""

    def _fixed_decision(self, request: Request) -> Decision:
        task = request.model if request.model not in (AUTO, BASE) else None
        if request.packs is not None:
            return self.generator.decide([""], packs=list(request.packs))[0]
        if task is None:
            return Decision(task=None, packs=(), probability=None)
        return self.generator.decide([""], task=task)[0]

    def _admit(self, job: Job, decision: Decision) -> None:
        if decision.packs and job.request.merge is not None:
            job.request.merge.check_count(len(decision.packs))
        job.decision = decision
        sampling = job.request.sampling
        sampled = None if sampling.greedy else (sampling.options(), next(self._unique) if sampling.seed is not None
                                                else None)
        job.key = (decision.packs, job.request.merge if decision.packs else None, job.renderer.stop_ids,
                   job.renderer.pad_id, sampled)
        job.deliver(Decided(decision, len(job.prompt_ids)))
        self._ready.append(job)

    # ------------------------------------------------------------------ batching

    def _next_batch(self) -> list[Job]:
        now = time.monotonic()
        for job in [j for j in self._ready if j.gone or now > j.deadline]:
            self._ready.remove(job)
            if now > job.deadline:
                job.deliver(Failed(504, "the request waited longer than the server's request timeout", "timeout"))
        if not self._ready:
            return []
        oldest = min(self._ready, key=lambda j: j.arrived)
        batch = sorted((j for j in self._ready if j.key == oldest.key), key=lambda j: j.arrived)[:self.max_batch]
        for job in batch:
            self._ready.remove(job)
        removed = set(oldest.decision.packs) - set(self.generator.active)
        if removed:  # removed since it was decided: never answered with it
            for job in batch:
                job.deliver(Failed(404, f"pack(s) {', '.join(sorted(removed))} were removed from the registry",
                                   "model_not_found"))
            return []
        return batch

    def _generate(self, batch: list[Job]) -> None:
        first = batch[0]
        packs = self.generator.opened(first.decision.packs)
        switches, hits = self.generator.patcher.switches, self.generator.patcher.cache_hits
        self.generator.patcher.use(packs, first.request.merge if packs else None)
        if self.generator.patcher.switches > switches:
            self.observe("switch", 1)
        if self.generator.patcher.cache_hits > hits:
            self.observe("cache_hit", 1)
        self.observe("batch", len(batch))
        rows = [Row(job.renderer, job.request.max_tokens, job.request.stop, strip=job.request.prompt is None,
                    on_text=lambda text, job=job: job.deliver(Text(text)), gone=lambda job=job: job.gone,
                    deadline=job.deadline) for job in batch]
        streams = BatchStreams(rows)
        sampling = first.request.sampling
        seeded = torch.random.fork_rng(devices=[]) if sampling.seed is not None else nullcontext()
        with seeded:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            generate_answers(self.generator.model, first.renderer, [job.prompt_ids for job in batch],
                             max_new_tokens=max(job.request.max_tokens for job in batch),
                             sampling=sampling.options(), streamer=streams, stopping=streams)
        for job, row in zip(batch, rows):
            self.observe("tokens", (job.request.model, len(row.tokens)))
            if row.finish == TIMEOUT:
                job.deliver(Failed(504, "the answer took longer than the server's request timeout", "timeout"))
            elif row.finish != CANCELLED:
                job.deliver(Finished(row.text(), row.finish, len(row.tokens)))
