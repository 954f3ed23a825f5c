"""Tasks scored with lm-evaluation-harness (``task add T --lm-eval TASK``), on the model object in
process: the activated model is handed to lm-eval's ``HFLM`` as it is, so no checkpoint is
written per evaluation.

A task is an lm-eval task or group name, with an optional folder of the user's own task YAML
(``include``), an example ``limit`` and the metric to record (default: the task's first). The
score is recorded as ``lm-eval/<metric>``; lm-eval's perplexities and bits per byte are lower-is-
better, as skillhub's own perplexity, and every other metric kept must be higher-is-better.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skillhub.errors import SkillhubError
from skillhub.scoring.prompts import PromptFormat, Renderer


PREFIX = "lm-eval/"
LOWER_IS_BETTER = {f"{PREFIX}{m}" for m in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")}
_METRIC_LENGTH = 32  # the registry's metric column


@dataclass(frozen=True)
class HarnessTask:
    """An lm-eval task as a skillhub task scores it."""

    task: str
    include: str | None = None  # folder of task YAML files (absolute)
    limit: int | None = None
    metric: str | None = None  # lm-eval's metric key ("acc", or "exact_match,strict-match" with its filter)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> HarnessTask:
        return cls(**document)

    @property
    def recorded_metric(self) -> str:
        """The metric name scores are recorded under."""
        return f"{PREFIX}{self.metric}"


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise SkillhubError("--lm-eval needs lm-evaluation-harness: pip install 'skillhub[lm-eval]'")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval and datasets draw progress bars on stderr and warn that HFLM got a model object (as
    meant): library code does not print, so both are held back; errors still raise."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=8)
def _task_manager(include: str | None):
    """lm-eval's index of its tasks (several seconds to build: kept per include folder)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, verbosity="ERROR")


def include_digest(include: str | None) -> str | None:
    """sha256 over the include folder's files (names and bytes), so an edited task is noticed."""
    if include is None:
        return None
    digest = hashlib.sha256()
    root = Path(include)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def resolve(task: str, *, include: str | None = None, limit: int | None = None,
            metric: str | None = None) -> HarnessTask:
    """Check that lm-eval knows ``task`` and that ``metric`` is one it reports; fill in the default metric.

    Raises:
        SkillhubError: lm-eval is not installed, the task or the metric does not exist, the limit
            is not positive, or the metric is lower-is-better and not one skillhub knows as such.
    """
    _require_lm_eval()
    if limit is not None and limit < 1:
        raise SkillhubError(f"--limit must be at least 1, got {limit}")
    if include is not None:
        if not Path(include).is_dir():
            raise SkillhubError(f"--lm-eval-include {include} is not a directory of lm-eval task YAML files")
        include = str(Path(include).resolve())
    with _quiet():
        manager = _task_manager(include)
    if task not in manager.all_tasks:
        close = [name for name in manager.all_tasks if task.lower() in name.lower()][:5]
        raise SkillhubError(f"lm-eval has no task {task!r}" + (f" (similar: {', '.join(close)})" if close else "")
                            + "; `lm-eval ls tasks` lists them, --lm-eval-include DIR adds your own YAML")
    with _quiet():
        directions = _directions(task, manager)
    names = list(directions)  # in the task's metric_list order: its first is the default
    chosen = metric or (names[0] if names else None)
    if chosen is None:
        raise SkillhubError(f"lm-eval task {task!r} reports no metric skillhub can record")
    base_name = chosen.split(",")[0]
    if base_name not in directions:
        raise SkillhubError(f"lm-eval task {task!r} has no metric {chosen!r}; it reports {', '.join(names)}")
    resolved = HarnessTask(task=task, include=include, limit=limit, metric=chosen)
    if len(resolved.recorded_metric) > _METRIC_LENGTH:
        raise SkillhubError(f"metric name {resolved.recorded_metric!r} is longer than {_METRIC_LENGTH} characters")
    if not directions[base_name] and resolved.recorded_metric not in LOWER_IS_BETTER:
        raise SkillhubError(f"metric {chosen!r} of {task!r} is lower-is-better; skillhub records higher-is-better "
                            f"metrics and perplexities ({', '.join(sorted(LOWER_IS_BETTER))}): pick another --metric")
    return resolved


def _directions(task: str, manager) -> dict[str, bool]:
    """Metric -> higher is better, over the task (or every task of a group)."""
    from lm_eval.tasks import get_task_dict

    found: dict[str, bool] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif hasattr(node, "higher_is_better"):
            found.update(node.higher_is_better())

    walk(get_task_dict([task], manager))
    return found


def score_task(model, tokenizer, task: HarnessTask, *, prompt_format: PromptFormat = PromptFormat(),
               batch_size: int = 16) -> float:
    """The task's metric for ``model`` as it is now (patched in place or not), through lm-eval's HFLM,
    its prompts rendered in ``prompt_format``: the chat format is lm-eval's own
    ``apply_chat_template`` (with the system turn as its ``system_instruction``), plain is ``<bos>`` +
    the prompt.

    Raises:
        SkillhubError: lm-eval does not report the metric for the task.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    chat = Renderer(tokenizer, prompt_format).kind == "chat"
    with _quiet():
        # add_bos_token for plain prompts: scored after the tokenizer's BOS, as every skillhub scorer
        # scores them; a chat template writes its own.
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       add_bos_token=not chat and tokenizer.bos_token is not None)
        results = simple_evaluate(model=wrapped, tasks=[task.task], task_manager=_task_manager(task.include),
                                  limit=task.limit, log_samples=False, verbosity="ERROR", bootstrap_iters=0,
                                  apply_chat_template=chat, system_instruction=prompt_format.system)
    scores = results["results"].get(task.task, {})
    key = task.metric if "," in task.metric else next(
        (k for k in sorted(scores) if k.split(",")[0] == task.metric and "_stderr" not in k), None)
    if key is None or key not in scores:
        raise SkillhubError(f"lm-eval reported no {task.metric!r} for task {task.task!r} (it reported "
                            f"{', '.join(k for k in sorted(scores) if ',' in k)})")
    return float(scores[key])
