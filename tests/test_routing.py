"""The router (features, scikit-learn fit stored as arrays + JSON, lifecycle), route eval, and
routed generation, on real fine-tunes of one tiny base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from skillhub.cli import main
from skillhub.demo.synthetic import split_examples, write_jsonl
from skillhub.errors import SkillhubError
from skillhub.registry.front import Registry
from skillhub.routing.router import RouteClass, Router
from skillhub.routing.training import fit, load_router, train_router

from conftest import ROUTED_TASKS as TASKS
from conftest import FineTune


def fresh(routed, tmp_path: Path) -> tuple[str, Registry]:
    copy = tmp_path / "registry"
    shutil.copytree(routed[0], copy)
    return str(copy), Registry(copy)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("classes", [2, 4])
def test_stored_router_computes_what_sklearn_predicts(classes: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(classes)
    features = torch.randn(120, 16, generator=generator) * 3 + 1
    labels = [int(i) % classes for i in range(120)]
    features[torch.arange(120), torch.tensor(labels)] += 4  # separable enough to fit
    names = [RouteClass(f"c{i}", f"c{i}", (f"{i:012x}",)) for i in range(classes + 1)]  # the last has no example
    coef, intercept, mean, scale = fit(features, labels, names)
    router = Router(classes=names, coef=coef, intercept=intercept, mean=mean, scale=scale, layer=1, threshold=0.5,
                    labels="task", base_fingerprint="f", known_packs=tuple(c.packs[0] for c in names))
    spec, arrays = router.to_stored()
    restored = Router.from_stored(json.loads(json.dumps(spec)), arrays)
    scaler = StandardScaler().fit(features.double().numpy())
    reference = LogisticRegression(max_iter=2000).fit(scaler.transform(features.double().numpy()), labels)
    expected = torch.from_numpy(reference.predict_proba(scaler.transform(features.double().numpy()))).float()
    probabilities = restored.probabilities(features)
    assert torch.allclose(probabilities[:, :classes], expected, atol=1e-4)
    assert torch.all(probabilities[:, classes] == 0)  # a class without examples is never chosen
    # Dropping a class (its pack removed) renormalizes the others and never picks it.
    dropped = restored.probabilities(features, active_packs=[c.packs[0] for c in names[1:]])
    assert torch.all(dropped[:, 0] == 0) and torch.allclose(dropped.sum(1), torch.ones(120))


def test_router_is_stored_in_the_registry_and_routes_held_out_prompts(routed) -> None:
    registry = Registry(routed[0])
    router = load_router(registry)
    assert [c.name for c in router.classes] == ["base", *sorted(TASKS)]
    assert router.info["accuracy"]["heldout"] >= 0.95
    assert any(e.kind == "route-train" for e in registry.log())
    result = run("--registry", str(routed[0]), "route", "eval", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"] >= 0.95
    for line in report["tasks"]:
        assert line["routed"] >= line["own_set"] - 0.05  # the router's mistakes are rare
    assert sum(map(sum, report["confusion"])) == sum(t["examples"] for t in report["tasks"])
    assert 0 <= report["spectral_accuracy"] <= 1
    shown = json.loads(run("--registry", str(routed[0]), "route", "show", "--json").stdout)
    assert shown["is_stale"] is False and shown["known_packs"] == list(routed[1].values())


def test_route_eval_on_a_labelled_file(routed, tmp_path: Path) -> None:
    rows = [{"prompt": e["prompt"], "answer": e["answer"], "task": "shift"}
            for e in split_examples("shift", train=0, test=30, seed=11)[1]]
    labelled = write_jsonl(rows, tmp_path / "labelled.jsonl")
    result = run("--registry", str(routed[0]), "route", "eval", "--eval", str(labelled), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(t["task"], t["examples"]) for t in report["tasks"]] == [("shift", 30)]
    line = report["tasks"][0]
    assert line["own_set"] >= 0.9 and line["routed"] >= line["own_set"] - 1 / 30  # at most one prompt misrouted
    typo = write_jsonl([{**rows[0], "task": "shfit"}], tmp_path / "typo.jsonl")
    result = run("--registry", str(routed[0]), "route", "eval", "--eval", str(typo))
    assert result.exit_code == 1 and "task 'shfit' is not a task of this base" in result.stderr


def test_generate_by_task_packs_and_route(routed, finetuned: FineTune) -> None:
    location, ids = routed[0], routed[1]
    prompts = ["shift abcde=", "rev hello=", "sort zyxwv="]
    result = run("--registry", str(location), "generate", *prompts, "--route", "--json", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["task"] for a in answers] == list(TASKS)
    assert [a["packs"] for a in answers] == [[ids[t]] for t in TASKS]
    assert all(a["probability"] >= 0.5 for a in answers)
    assert answers[0]["output"] == "bcdef"  # the shift fine-tune is exact
    by_task = json.loads(run("--registry", str(location), "generate", prompts[0], "--task", "shift", "--json",
                             "--max-new-tokens", "8").stdout)
    assert by_task[0]["output"] == "bcdef" and by_task[0]["probability"] is None
    by_ids = json.loads(run("--registry", str(location), "generate", prompts[0], "--packs", ids["shift"], "--json",
                            "--max-new-tokens", "8").stdout)
    assert by_ids[0]["output"] == "bcdef"


def test_python_generator_in_a_loop_restores_the_base(routed) -> None:
    from skillhub.routing import Generator

    registry = Registry(routed[0])
    with Generator(registry, max_new_tokens=6) as generator:
        pristine = {n: p.detach().clone() for n, p in generator.model.named_parameters()}
        answers = list(generator.stream(["shift abcde=", "rev abcde=", "shift bcdef="], route=True))
        assert [a.task for a in answers] == ["shift", "reverse", "shift"]
        assert answers[0].output == "bcdef" and answers[2].output == "cdefg"
    assert all(torch.equal(p, pristine[n]) for n, p in generator.model.named_parameters())


def test_removing_a_pack_drops_its_class_exactly(routed, tmp_path: Path) -> None:
    location, registry = fresh(routed, tmp_path)
    prompts = [e["prompt"] for task in TASKS for e in split_examples(task, train=0, test=20, seed=9)[1]]
    before = json.loads(run("--registry", location, "generate", *prompts, "--route", "--json",
                            "--max-new-tokens", "1").stdout)
    registry.remove(routed[1]["reverse"])
    after = run("--registry", location, "generate", *prompts, "--route", "--json", "--max-new-tokens", "6")
    assert after.exit_code == 0, after.output
    after = json.loads(after.stdout)
    assert all(routed[1]["reverse"] not in a["packs"] for a in after)
    for old, new in zip(before, after):
        if old["task"] != "reverse":
            assert (new["task"], new["packs"]) == (old["task"], old["packs"])  # the others route as before
    shown = json.loads(run("--registry", location, "route", "show", "--json").stdout)
    assert shown["stale"]["removed"] == [routed[1]["reverse"]]


def test_bad_routing_input_is_one_line_and_changes_nothing(routed, three_packs, finetuned: FineTune,
                                                           tmp_path: Path) -> None:
    location, registry = fresh(routed, tmp_path)

    def refused(args: list[str], message: str, where: str = location) -> None:
        log = Registry(where).log() if Path(where, "registry.db").exists() else None
        result = run("--registry", where, *args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        if log is not None:
            assert Registry(where).log() == log

    refused(["generate", "a" * 70 + "=", "--task", "shift"], "more than the model's context of 64")
    refused(["generate", "shift abc=", "--route", "--max-new-tokens", "60"], "lower --max-new-tokens")
    refused(["generate", "shift abc=", "--packs", " , "], "--packs names no pack")
    refused(["generate", "shift abc=", "--packs", "ffffffffffff"], "no pack 'ffffffffffff'")
    refused(["generate", "shift abc=", "--task", "nosuchtask"], "no task 'nosuchtask'")
    refused(["route", "train", "--labels", "vibes"], "unknown --labels")
    refused(["route", "train", "--threshold", "1.5"], "--threshold must be in [0, 1)")
    refused(["route", "train", "--layer", "9"], "--layer 9 is out of range")
    # A pack added since training makes the router stale: say how to retrain.
    registry.remove(routed[1]["sort"])
    shutil.rmtree(tmp_path / "scratch", ignore_errors=True)
    registry.add(three_packs["sort"], task="sorting")
    refused(["generate", "sort abc=", "--route"], "`skillhub route train`")
    assert run("--registry", location, "generate", "sort abc=", "--route", "--allow-stale").exit_code == 0
    # No router, and no packs to route to.
    empty = tmp_path / "empty"
    other = Registry(empty)
    other.add(three_packs["shift"], task="shift", base_location=str(finetuned.base))
    refused(["route", "show"], "no router", str(empty))
    refused(["route", "train"], "no routing examples", str(empty))
    other.remove(other.list_packs()[0].id)
    refused(["generate", "shift abc=", "--route"], "no active packs", str(empty))
    # A router trained for other base weights (say, a routers row copied from another registry) is refused.
    import sqlite3

    stored = registry.stored_router()
    with sqlite3.connect(Path(location) / "registry.db") as connection:
        connection.execute("UPDATE routers SET spec = ?", (json.dumps({**stored.spec, "base_fingerprint": "0" * 64}),))
    refused(["generate", "shift abc=", "--route", "--allow-stale"], "retrain it with `skillhub route train --base")
    refused(["route", "eval", "--allow-stale"], "was trained for base weights 0000")


def test_loss_labels_follow_the_lowest_answer_loss(routed, tmp_path: Path) -> None:
    from skillhub.routing import Generator

    _, registry = fresh(routed, tmp_path)
    trained = train_router(registry, labels="loss", layer=2)
    assert load_router(registry).labels == "loss" and trained.router.layer == 2
    # The shift pack is exact on shift: every shift example's answer is likeliest under it.
    assert trained.router.info["examples"]["per_class"]["shift"] >= 50
    with Generator(registry) as generator:
        decisions = generator.decide(["shift abcde=", "shift qwert=", "shift mnbvc="], route=True)
    assert [d.task for d in decisions] == ["shift"] * 3


def test_routing_examples_of_a_task_and_of_the_base_class(routed, tmp_path: Path) -> None:
    location, registry = fresh(routed, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "x"}\n')
    result = run("--registry", location, "route", "examples", "shift", str(bad))
    assert result.exit_code == 1 and "line 1 needs 'prompt'" in result.stderr
    assert registry.routing_examples() == []
    general = write_jsonl([{"prompt": f"copy {w}="} for w in ("abcde", "hello", "qwert", "zzzzz", "mnopq") * 4],
                          tmp_path / "general.jsonl")
    result = run("--registry", location, "route", "examples", "@base", str(general), "--json")
    assert result.exit_code == 0, result.output
    assert [s.name for s in registry.routing_examples()] == ["@base"]
    trained = train_router(registry)
    assert trained.router.info["examples"]["per_class"]["base"] > 0  # the base class is now taught
    with pytest.raises(SkillhubError, match="changed or vanished"):
        general.write_text(general.read_text() + '{"prompt": "copy x="}\n')
        train_router(registry)


def test_evaluation_scores_the_other_policies_when_the_router_cannot_be_retrained(routed, three_packs,
                                                                                   tmp_path: Path) -> None:
    from skillhub.evaluation.forgetting import evaluate_tasks

    _, registry = fresh(routed, tmp_path)
    for pack_id in routed[1].values():
        registry.remove(pack_id)
    registry.add(three_packs["shift"], task="other")  # a task with no examples: only the base class is left
    records = evaluate_tasks(registry, merge=None)
    assert {r["policy"] for r in records} == {"subset", "fused", "base"}
    assert registry.stored_router().spec["known_packs"] == list(routed[1].values())  # the old router is kept
