"""Tasks scored with lm-evaluation-harness (`task add T --lm-eval TASK`), offline: a custom lm-eval
task defined in local YAML over local JSON data the test writes, scored on the model in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillhub.cli import main
from skillhub.demo.synthetic import split_examples, write_jsonl
from skillhub.evaluation.forgetting import accuracy_matrices
from skillhub.scoring.harness import HarnessTask, score_task
from skillhub.scoring.scores import exact_match
from skillhub.registry.front import Registry

from conftest import FineTune

# The demo's character tokenizer adds no BOS by itself (Llama's does): the task's text starts with
# it, as every skillhub scorer starts a prompt with it, and lm-eval then adds none of its own.
TASK_YAML = """task: skillhub_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "<s>{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def write_task(folder: Path, name: str, examples: list[dict[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(examples, folder / f"{name}.jsonl")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return folder


def run(registry: Path, *args: str):
    return CliRunner().invoke(main, ["--registry", str(registry), *args])


@pytest.fixture(scope="module")
def shift_examples() -> list[dict[str, str]]:
    return split_examples("shift", train=10, test=40, seed=9)[1]


def test_lm_eval_scores_the_model_object_like_our_own_scorer(finetuned: FineTune, shift_examples, tmp_path: Path) -> None:
    """lm-eval's greedy-continuation accuracy on the tuned model, through HFLM in process, agrees with
    skillhub's teacher-forced exact match (which also needs the end-of-sequence token)."""
    folder = write_task(tmp_path / "tasks", "shift", shift_examples)
    model = AutoModelForCausalLM.from_pretrained(finetuned.tuned).eval()
    tokenizer = AutoTokenizer.from_pretrained(finetuned.tuned)
    task = HarnessTask("skillhub_shift", include=str(folder), metric="acc")
    accuracy = score_task(model, tokenizer, task)
    ours = exact_match(model, tokenizer, shift_examples)
    assert accuracy >= ours - 1e-9 and ours >= 0.9
    limited = score_task(model, tokenizer, HarnessTask("skillhub_shift", include=str(folder), limit=5, metric="acc"))
    assert limited * 5 == pytest.approx(round(limited * 5))  # five examples scored


def test_lm_eval_task_in_the_forgetting_matrices(paper_pack, finetuned: FineTune, shift_examples,
                                                 tmp_path: Path) -> None:
    folder = write_task(tmp_path / "tasks", "shift", shift_examples)
    registry_dir = tmp_path / "registry"
    assert run(registry_dir, "init", "--base", str(finetuned.base)).exit_code == 0
    declared = run(registry_dir, "task", "add", "shift", "--lm-eval", "skillhub_shift", "--lm-eval-include",
                   str(folder), "--json")
    assert declared.exit_code == 0, declared.output
    document = json.loads(declared.stdout)
    assert document["task"]["metric"] == "lm-eval/acc" and document["task"]["lm_eval"]["include"] == str(folder.resolve())
    base_score = document["scores"][0]["score"]
    assert base_score <= 0.1  # the untrained base cannot shift letters
    added = run(registry_dir, "add", str(paper_pack.path), "--task", "shift", "--json")
    assert added.exit_code == 0, added.output
    scores = {(r["policy"], r["metric"]): r["score"] for r in json.loads(added.stdout)["scores"]}
    assert scores[("subset", "lm-eval/acc")] >= 0.9 and scores[("base", "lm-eval/acc")] == base_score
    result = accuracy_matrices(Registry(registry_dir))
    assert result["policies"]["subset"]["R"] == [[scores[("subset", "lm-eval/acc")]]]

    # A second metric of the same task, lower-is-better: enters the matrices negated, as perplexity does.
    perplexity = run(registry_dir, "task", "add", "shift-ppl", "--lm-eval", "skillhub_shift", "--lm-eval-include",
                     str(folder), "--metric", "perplexity", "--limit", "10", "--json")
    assert perplexity.exit_code == 0, perplexity.output
    assert json.loads(perplexity.stdout)["task"]["metric"] == "lm-eval/perplexity"

    # An edited task folder is noticed before anything is scored.
    (folder / "shift.yaml").write_text((folder / "shift.yaml").read_text().replace("acc", "acc_norm", 1))
    stale = run(registry_dir, "eval")
    assert stale.exit_code == 1 and "changed or vanished" in stale.output


@pytest.mark.parametrize("case", ["unknown-task", "unknown-metric", "limit-0", "eval-and-lm-eval", "include-missing"])
def test_bad_lm_eval_input_is_refused_before_anything_is_recorded(case: str, finetuned: FineTune, shift_examples,
                                                                  tmp_path: Path) -> None:
    folder = write_task(tmp_path / "tasks", "shift", shift_examples)
    registry_dir = tmp_path / "registry"
    assert run(registry_dir, "init", "--base", str(finetuned.base)).exit_code == 0
    args, message, code = {
        "unknown-task": (["--lm-eval", "skillhub_shfit", "--lm-eval-include", str(folder)],
                         "lm-eval has no task 'skillhub_shfit'", 1),
        "unknown-metric": (["--lm-eval", "skillhub_shift", "--lm-eval-include", str(folder), "--metric", "f1"],
                           "has no metric 'f1'", 1),
        "limit-0": (["--lm-eval", "skillhub_shift", "--lm-eval-include", str(folder), "--limit", "0"],
                    "--limit must be at least 1", 1),
        "eval-and-lm-eval": (["--lm-eval", "skillhub_shift", "--eval", str(folder / "shift.jsonl")],
                             "give --eval FILE or --lm-eval TASK", 2),
        "include-missing": (["--lm-eval", "skillhub_shift", "--lm-eval-include", str(tmp_path / "nowhere")],
                            "is not a directory", 1),
    }[case]
    result = run(registry_dir, "task", "add", "shift", *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    if code == 1:
        assert len(result.output.strip().splitlines()) == 1
    assert Registry(registry_dir).tasks() == [] and Registry(registry_dir).scores() == []
