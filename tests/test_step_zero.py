"""The continual-learning protocol from step zero: a base registered before any pack (`init --base`),
tasks declared and the base scored on them before the first addition, complete accuracy matrices."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from skillhub.cli import main
from skillhub.demo.synthetic import split_examples, write_jsonl
from skillhub.evaluation.forgetting import accuracy_matrices
from skillhub.registry.front import Registry

from conftest import FineTune

TASKS = ("reverse", "shift")  # shift last: its pack is the strong one (R[1][1])


def run(registry: Path, *args: str):
    return CliRunner().invoke(main, ["--registry", str(registry), *args])


def eval_file(task: str, root: Path) -> Path:
    _, test = split_examples(task, train=10, test=30, seed=7)
    return write_jsonl(test, root / f"{task}-eval.jsonl")


def test_tasks_declared_before_the_first_pack_give_complete_matrices(three_packs, finetuned: FineTune,
                                                                      tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    refused = run(registry_dir, "task", "add", "shift", "--eval", str(eval_file("shift", tmp_path)))
    assert refused.exit_code == 1 and "skillhub init --base BASE" in refused.output

    first = run(registry_dir, "init", "--base", str(finetuned.base), "--json")
    assert first.exit_code == 0, first.output
    registered = json.loads(first.stdout)["base"]
    assert registered["created"] is True and registered["location"] == str(finetuned.base.resolve())
    again = run(registry_dir, "init", "--base", str(finetuned.base), "--json")
    assert json.loads(again.stdout)["base"]["created"] is False  # same weights: the same entry

    declared = {}
    for task in TASKS:  # before any pack: the base is scored on each task at its task-add step
        result = run(registry_dir, "task", "add", task, "--eval", str(eval_file(task, tmp_path)), "--json")
        assert result.exit_code == 0, result.output
        declared[task] = json.loads(result.stdout)
    registry = Registry(registry_dir)
    step_zero = [r for r in registry.scores() if r.event == "task-add"]
    assert {(r.task, r.policy) for r in step_zero} == {(t, "base") for t in TASKS}
    assert [e.kind for e in registry.log()] == ["base", "task-add", "task-add"]

    for task in TASKS:  # the packs join the base registered by init (same fingerprint), not a new one
        added = run(registry_dir, "add", str(three_packs[task]), "--task", task, "--json")
        assert added.exit_code == 0, added.output
        assert json.loads(added.stdout)["base"] == registered["name"]
    result = accuracy_matrices(registry)
    assert result["tasks"] == list(TASKS)
    subset = result["policies"]["subset"]
    # Declared before its pack, the second task was scored at the first addition: R is complete
    # and forward transfer (R[0][1] - b_1) is defined.
    assert subset["complete"] is True and all(v is not None for row in subset["R"] for v in row)
    assert subset["metrics"]["FWT"] is not None
    # The base's scores at each addition equal those taken when the tasks were declared (same weights).
    assert result["base"] == [declared[t]["scores"][0]["score"] for t in TASKS]
    assert subset["R"][1][1] >= 0.9 > result["base"][1]


def test_declared_late_a_task_leaves_a_hole_that_step_zero_avoids(three_packs, finetuned: FineTune,
                                                                   tmp_path: Path) -> None:
    """The old order (first pack, then the second task's eval set) leaves R[0][1] empty."""
    registry = Registry(tmp_path / "registry")
    from skillhub.evaluation.forgetting import add_and_score

    add_and_score(registry, three_packs["shift"], task="shift", eval_file=eval_file("shift", tmp_path),
                  base_location=str(finetuned.base), merge=None)
    add_and_score(registry, three_packs["reverse"], task="reverse", eval_file=eval_file("reverse", tmp_path),
                  merge=None)
    subset = accuracy_matrices(registry)["policies"]["subset"]
    assert subset["R"][0][1] is None and subset["complete"] is False and subset["metrics"] is None


def test_init_base_bad_input(finetuned: FineTune, three_packs, tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    missing = run(registry_dir, "init", "--base", str(tmp_path / "nowhere"))
    assert missing.exit_code == 1 and "nowhere" in missing.output and len(missing.output.strip().splitlines()) == 1
    assert run(registry_dir, "init", "--name", "x").exit_code == 2  # --name without --base
    assert run(registry_dir, "init", "--base", str(finetuned.base), "--name", "tiny").exit_code == 0
    taken = run(registry_dir, "init", "--base", str(finetuned.tuned), "--name", "tiny")
    assert taken.exit_code == 1 and "already registered with other weights" in taken.output
    renamed = run(registry_dir, "init", "--base", str(finetuned.base), "--name", "other")
    assert renamed.exit_code == 1 and "already registered as base tiny" in renamed.output
    # A pack of these weights joins the base under the name init gave it.
    joined = run(registry_dir, "add", str(three_packs["shift"]), "--task", "shift", "--no-eval")
    assert joined.exit_code == 0, joined.output
    assert {e.base for e in Registry(registry_dir).log()} == {"tiny"}


def test_task_add_without_scoring_records_no_step_zero(finetuned: FineTune, tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    assert run(registry_dir, "init", "--base", str(finetuned.base)).exit_code == 0
    result = run(registry_dir, "task", "add", "shift", "--eval", str(eval_file("shift", tmp_path)), "--no-eval")
    assert result.exit_code == 0 and "base model" not in result.output
    assert Registry(registry_dir).scores() == []
