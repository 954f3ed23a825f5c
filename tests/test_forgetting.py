"""Forgetting metrics: definitions on hand-computed matrices, scoring, evaluation at every addition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillhub.cli import main
from skillhub.scoring.scores import exact_match, perplexity
from skillhub.evaluation.forgetting import accuracy_matrices, evaluate_tasks
from skillhub.scoring.metrics import continual_metrics
from skillhub.registry.front import Registry
from skillhub.demo.synthetic import split_examples, write_jsonl

from conftest import FineTune


def test_metrics_on_a_hand_computed_matrix() -> None:
    matrix = [[0.9, 0.1, 0.0],
              [0.5, 0.8, 0.2],
              [0.3, 0.6, 0.7]]
    result = continual_metrics(matrix, [0.0, 0.1, 0.2])
    assert result["ACC"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert result["BWT"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)  # -0.4: forgetting
    assert result["FWT"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.2)) / 2)
    assert result["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)


def test_forgetting_is_max_based_not_diagonal_based() -> None:
    """Task 0 improves after task 1 (0.5 -> 0.9), then drops to 0.4: forgetting counts from the best, 0.9."""
    matrix = [[0.5, 0.0, 0.0],
              [0.9, 0.7, 0.1],
              [0.4, 0.7, 0.8]]
    result = continual_metrics(matrix, [0.0, 0.0, 0.0])
    assert result["BWT"] == pytest.approx(((0.4 - 0.5) + (0.7 - 0.7)) / 2)  # -0.05
    assert result["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.7 - 0.7)) / 2)  # 0.25
    assert result["FWT"] == pytest.approx((0.0 + 0.1) / 2)


def test_single_task_and_bad_shapes() -> None:
    assert continual_metrics([[0.7]], [0.1]) == {"ACC": 0.7, "BWT": None, "FWT": None, "forgetting": None}
    with pytest.raises(ValueError):
        continual_metrics([[0.1, 0.2]], [0.0])


def test_teacher_forced_exact_match_equals_greedy_generation(finetuned: FineTune) -> None:
    tokenizer = AutoTokenizer.from_pretrained(finetuned.tuned)
    model = AutoModelForCausalLM.from_pretrained(finetuned.tuned, dtype=torch.float32)
    examples = finetuned.test[:40]
    generated = 0
    for example in examples:
        prompt = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(example["prompt"], add_special_tokens=False)]])
        output = model.generate(prompt, max_new_tokens=len(example["answer"]) + 1, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=False)
        generated += text == example["answer"] + tokenizer.eos_token
    assert exact_match(model, tokenizer, examples) == pytest.approx(generated / len(examples))
    assert generated / len(examples) >= 0.9


def test_perplexity_drops_when_the_text_is_learned(finetuned: FineTune, tmp_path: Path) -> None:
    """A short language-model fine-tune on task texts lowers held-out perplexity on such texts."""
    from skillhub.demo.train import finetune

    train, test = split_examples("shift", train=500, test=50, seed=3)
    as_text = lambda examples: [{"text": e["prompt"] + e["answer"]} for e in examples]  # noqa: E731
    lm = finetune(finetuned.base, [{"prompt": "", "answer": t["text"]} for t in as_text(train)], tmp_path / "lm",
                  steps=80)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    base_model = AutoModelForCausalLM.from_pretrained(finetuned.base, dtype=torch.float32)
    lm_model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    held_out = as_text(test)
    assert 1.0 <= perplexity(lm_model, tokenizer, held_out) < perplexity(base_model, tokenizer, held_out) / 2
    # One example: perplexity is exp of transformers' own mean token loss on <s> text </s>.
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(held_out[0]["text"], add_special_tokens=False),
                         tokenizer.eos_token_id]])
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.no_grad():
        loss = lm_model(input_ids=ids, labels=labels).loss
    assert perplexity(lm_model, tokenizer, held_out[:1]) == pytest.approx(float(torch.exp(loss)), rel=1e-5)


@pytest.fixture
def evaluated_registry(three_packs, finetuned: FineTune, tmp_path: Path) -> tuple[Registry, dict[str, str]]:
    registry = Registry(tmp_path / "registry")
    ids = {}
    for number, task in enumerate(("shift", "reverse", "sort")):
        entry = registry.add(three_packs[task], task=task, base_location=str(finetuned.base))
        if number == 0:
            for each in ("shift", "reverse", "sort"):
                _, test = split_examples(each, train=10, test=40, seed=5)
                registry.add_task(each, write_jsonl(test, tmp_path / f"{each}.jsonl"))
        evaluate_tasks(registry, step=entry.event)
        ids[task] = entry.id
    return registry, ids


def test_every_addition_scores_every_task_under_every_policy(evaluated_registry) -> None:
    registry, ids = evaluated_registry
    records = registry.scores()
    assert len(records) == 3 * 3 * 4  # 3 additions x 3 tasks x (subset, fused, ties, base); no router: no routed
    result = accuracy_matrices(registry)
    assert result["tasks"] == ["shift", "reverse", "sort"]
    subset = result["policies"]["subset"]
    # Task-subset activation cannot forget: a task's set never changes when others are added.
    for j in range(3):
        assert len({subset["R"][k][j] for k in range(j, 3)}) == 1
    assert subset["metrics"]["forgetting"] == 0.0 and subset["metrics"]["BWT"] == 0.0
    assert subset["R"][0][0] >= 0.9  # the shift pack does its job
    assert all(b <= 0.05 for b in result["base"])
    assert result["policies"]["fused"]["complete"] is True and result["policies"]["ties"]["complete"] is True
    assert "routed" not in result["policies"]


def test_metrics_command_json_table_and_plot(evaluated_registry, tmp_path: Path) -> None:
    registry, _ = evaluated_registry
    runner = CliRunner()
    as_json = runner.invoke(main, ["--registry", registry.url, "metrics", "--json"])
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.stdout)
    assert set(parsed["policies"]) == {"subset", "fused", "ties"} and "BWT" in parsed["definitions"]
    plot = tmp_path / "r.png"
    table = runner.invoke(main, ["--registry", registry.url, "metrics", "--plot", str(plot)])
    assert table.exit_code == 0 and "| policy | ACC | BWT | FWT | forgetting |" in table.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_records_a_new_step(evaluated_registry) -> None:
    registry, _ = evaluated_registry
    result = CliRunner().invoke(main, ["--registry", registry.url, "eval", "--task", "sort", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["policy"] for r in json.loads(result.stdout)} == {"subset", "fused", "ties", "base"}
    assert registry.log()[-1].kind == "eval"
    result = CliRunner().invoke(main, ["--registry", registry.url, "eval", "--task", "sort", "--merged-policy",
                                       "dare-ties", "--json"])
    assert {r["policy"] for r in json.loads(result.stdout)} == {"subset", "fused", "dare-ties", "base"}
    # With a router, the routed policy joins (examples it did not train on only).
    from skillhub.routing.training import train_router

    train_router(registry)
    result = CliRunner().invoke(main, ["--registry", registry.url, "eval", "--merged-policy", "none", "--json"])
    records = json.loads(result.stdout)
    assert {r["policy"] for r in records} == {"subset", "fused", "routed", "base"}
    routed = {r["task"]: r["score"] for r in records if r["policy"] == "routed"}
    assert routed["shift"] >= 0.9  # the router sends shift prompts to the shift pack


@pytest.mark.parametrize("case", ["missing field", "empty", "unknown task", "plot directory", "changed file"])
def test_bad_evaluation_input_exits_1_and_records_nothing(evaluated_registry, tmp_path: Path, case: str) -> None:
    registry, _ = evaluated_registry
    before = (registry.log(), registry.scores(), registry.tasks())
    bad = tmp_path / "bad.jsonl"
    args = ["--registry", registry.url]
    if case == "missing field":
        bad.write_text('{"prompt": "shift abc="}\n')
        args += ["task", "add", "shift", "--eval", str(bad)]
        expected = "line 1 needs 'prompt' and 'answer' for metric exact_match"
    elif case == "empty":
        bad.write_text("\n")
        args += ["task", "add", "shift", "--eval", str(bad)]
        expected = "holds no examples"
    elif case == "unknown task":
        args += ["eval", "--task", "juggling"]
        expected = "no task 'juggling' with an eval set"
    elif case == "plot directory":
        args += ["metrics", "--plot", str(tmp_path / "missing" / "r.png")]
        expected = "directory " + str(tmp_path / "missing") + " does not exist"
    else:
        eval_file = registry.eval_sets(task="sort")[0].path
        eval_file.write_text(eval_file.read_text() + '{"prompt": "sort ab=", "answer": "ab"}\n')
        args += ["eval"]
        expected = "changed or vanished since it was added"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and expected in result.stderr, result.stderr
    assert (registry.log(), registry.scores(), registry.tasks()) == before


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_fast(tmp_path: Path, seed: int) -> None:
    """The demo's claims, not its digits, on its fast setting and two seeds (two minutes each on 2 cores)."""
    result = CliRunner().invoke(main, ["demo", "--tiny", "--fast", "--seed", str(seed),
                                       "--workdir", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tasks, final = report["tasks"], report["final"]
    subset = report["matrices"]["policies"]["subset"]
    assert subset["metrics"]["forgetting"] == 0.0  # task-subset activation forgets nothing
    for task in tasks:
        kept = report["retention"][task]
        assert kept["fine-tune"] >= 0.9, (task, kept)  # every task is really learned
        assert kept["pack"] >= 0.95 * kept["fine-tune"], (task, kept)  # and its pack keeps it
        assert final["routed"][task] >= final["subset"][task] - 0.02, task  # routing without labels costs <= 2 points
        assert final["fused"][task] <= 0.5 * final["subset"][task], task  # summing every pack collapses
    assert report["routing"]["accuracy"]["heldout"] >= 0.98
    assert set(report["matrices"]["policies"]) >= {"subset", "fused", "routed", "ties"}
    removal = report["removal"]
    removed_index = tasks.index(removal["task"])
    before, after = removal["before"], removal["after"]
    assert after["subset"][removal["task"]] == report["matrices"]["base"][removed_index]  # back to the base
    assert after["routed"][removal["task"]] <= 0.1  # never routed to the removed pack again
    for task in before["subset"]:
        if task != removal["task"]:
            assert after["subset"][task] == before["subset"][task]  # the others exactly where they were
            # Routed: the removed pack's class is dropped and the rest renormalised, so a prompt routed
            # right stays right; only a prompt the router had sent to the removed class is decided
            # again. The others' routed scores can rise, never fall.
            assert after["routed"][task] >= before["routed"][task]
    graft = report["graft"]  # a task only the GPT-2 source can do, grafted into the base
    assert graft["source"]["score"] >= 0.9 and graft["target_before"] <= 0.1, graft
    assert graft["sft"] >= 0.9 and graft["pairs"] > 0, graft
    assert graft["dpo"] >= graft["sft"] - 0.02, graft  # DPO does not undo SFT
    assert graft["pack"] >= 0.95 * graft["dpo"], graft  # the pack keeps the SFT+DPO model's score
    assert all(o["before"] == o["after"] for o in graft["others"].values()), graft  # the others untouched
    assert Path(report["paths"]["registry"], "registry.db").is_file()
    assert report["paths"]["plot"] and Path(report["paths"]["plot"]).is_file()
