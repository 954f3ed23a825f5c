"""The registry on SQLite and PostgreSQL: lineage, Eq. 10 activation, unlearning by removal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from skillhub import apply_packs, load_pack
from skillhub.errors import MismatchError, PackError
from skillhub.io.checkpoint import Checkpoint, fingerprint
from skillhub.errors import NotFoundError, RegistryError
from skillhub.registry.results import TaskSet
from skillhub.demo.synthetic import build_tiny_model

from conftest import FineTune


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


def _same_bits(a: Path, b: Path) -> bool:
    return fingerprint(Checkpoint(a)) == fingerprint(Checkpoint(b))


def _add_all(registry, three_packs: dict[str, Path], finetuned: FineTune, tasks=("shift", "reverse", "sort")):
    return {t: registry.add(three_packs[t], task=t, base_location=str(finetuned.base)).id for t in tasks}


def test_three_tasks_in_sequence(registry_factory, three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    registry = registry_factory()
    ids = _add_all(registry, three_packs, finetuned)
    listed = registry.list_packs()
    assert [p.id for p in listed] == [ids["shift"], ids["reverse"], ids["sort"]]
    assert [p.position for p in listed] == [1, 2, 3]
    assert {t.name: list(t.packs) for t in registry.tasks()} == {t: [i] for t, i in ids.items()}
    for task_name in ids:
        activated = registry.activate(tmp_path / f"act-{task_name}", task=task_name)
        applied = apply_packs(finetuned.base, [three_packs[task_name]], tmp_path / f"apply-{task_name}")
        assert _same_bits(activated, applied), task_name
    assert [(e.kind, e.pack) for e in registry.log()] == [
        ("base", None), ("add", ids["shift"]), ("add", ids["reverse"]), ("add", ids["sort"])]


def test_removal_is_exact_unlearning(registry_factory, three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    registry = registry_factory()
    ids = _add_all(registry, three_packs, finetuned)
    registry.set_task("both", [ids["shift"], ids["reverse"]])
    registry.remove(ids["reverse"], purge=True)

    never = registry_factory()
    never_ids = _add_all(never, three_packs, finetuned, tasks=("shift", "sort"))
    never.set_task("both", [never_ids["shift"]])
    for task_name in ("shift", "sort", "both"):
        after = registry.activate(tmp_path / f"after-{task_name}", task=task_name)
        reference = never.activate(tmp_path / f"never-{task_name}", task=task_name)
        assert _same_bits(after, reference), task_name
    # The removed pack's own task falls back to the base model, bit for bit.
    assert _same_bits(registry.activate(tmp_path / "reverse", task="reverse"), finetuned.base)
    assert not registry.store.path(registry.show(ids["reverse"]).sha256).exists()
    assert [e.kind for e in registry.log()] == ["base", "add", "add", "add", "task-set", "remove", "purge"]
    assert [p.id for p in registry.list_packs()] == [ids["shift"], ids["sort"]]
    assert registry.list_packs(include_removed=True)[1].state == "removed"


def test_task_set_and_explicit_packs(registry_factory, three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    registry = registry_factory()
    ids = _add_all(registry, three_packs, finetuned)
    result = registry.set_task("shift", [ids["sort"], ids["shift"]])
    assert result == TaskSet(name="shift", explicit=True, packs=(ids["shift"], ids["sort"]))  # lineage order
    activated = registry.activate(tmp_path / "a", task="shift")
    applied = apply_packs(finetuned.base, [three_packs["shift"], three_packs["sort"]], tmp_path / "b")
    assert _same_bits(activated, applied)
    by_ids = registry.activate(tmp_path / "c", packs=[ids["sort"][:6], ids["shift"]])
    assert _same_bits(by_ids, applied)
    event = registry.log()[-1]
    assert (event.kind, event.task, event.detail) == ("task-set", "shift", {"packs": [ids["sort"], ids["shift"]]})


def test_activated_patches_in_place_and_restores_exact_bits(registry_factory, three_packs, finetuned: FineTune,
                                                            tmp_path: Path) -> None:
    registry = registry_factory()
    _add_all(registry, three_packs, finetuned)
    model = AutoModelForCausalLM.from_pretrained(finetuned.base, dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {t: _weights(registry.activate(tmp_path / t, task=t)) for t in ("shift", "sort")}
    for _ in range(2):  # switching back and forth never accumulates error
        for task_name in ("shift", "sort"):
            with registry.activated(model, task=task_name) as patched:
                state = patched.state_dict()
                for name, tensor in expected[task_name].items():
                    assert torch.equal(state[name], tensor), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_activated_refuses_a_model_that_is_not_the_base(registry_factory, three_packs, finetuned: FineTune) -> None:
    registry = registry_factory()
    _add_all(registry, three_packs, finetuned, tasks=("shift",))
    tuned = AutoModelForCausalLM.from_pretrained(finetuned.tuned, dtype=torch.float32)
    with pytest.raises(MismatchError, match="not the registered base"):
        with registry.activated(tuned, task="shift"):
            pass


def test_pack_for_another_base_is_refused(registry_factory, three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    from skillhub import create_pack

    registry = registry_factory()
    _add_all(registry, three_packs, finetuned, tasks=("shift",))
    other_base = build_tiny_model(tmp_path / "other-base", seed=7)
    other = create_pack(other_base, finetuned.tuned, tmp_path / "other", task="shift")
    before = registry.log()
    with pytest.raises(MismatchError, match=r"made for base other-base .* differs from the registered base"):
        registry.add(other.path, task="shift")
    with pytest.raises(MismatchError, match="not for the registered base base"):
        registry.add(other.path, task="shift", base="base")
    assert registry.log() == before and len(registry.list_packs()) == 1
    entry = registry.add(other.path, task="shift", new_base=True)
    assert entry.base == "other-base" and len(registry.list_packs()) == 2
    with pytest.raises(RegistryError, match="several base models"):
        registry.tasks()


@pytest.mark.parametrize("case", ["unknown pack", "unknown task", "removed twice", "already added"])
def test_bad_requests_leave_the_registry_unchanged(registry_factory, three_packs, finetuned: FineTune,
                                                   tmp_path: Path, case: str) -> None:
    registry = registry_factory()
    ids = _add_all(registry, three_packs, finetuned, tasks=("shift",))
    if case == "removed twice":
        registry.remove(ids["shift"])
    before = (registry.log(), registry.list_packs(include_removed=True), registry.tasks())
    with pytest.raises((NotFoundError, RegistryError)) as info:
        if case == "unknown pack":
            registry.remove("0123abc")
        elif case == "unknown task":
            registry.activate(tmp_path / "out", task="juggling")
        elif case == "removed twice":
            registry.remove(ids["shift"])
        else:
            registry.add(three_packs["shift"], task="shift")
    message = str(info.value)
    assert {"unknown pack": "no pack '0123abc'", "unknown task": "no task 'juggling'",
            "removed twice": "already removed", "already added": "is already in the registry"}[case] in message
    assert (registry.log(), registry.list_packs(include_removed=True), registry.tasks()) == before
    assert not (tmp_path / "out").exists()


def test_corrupt_blob_is_refused_and_reported(registry_factory, three_packs, finetuned: FineTune,
                                              tmp_path: Path) -> None:
    registry = registry_factory()
    ids = _add_all(registry, three_packs, finetuned, tasks=("shift", "sort"))
    stored = registry.store.path(registry.show(ids["sort"]).sha256) / "skillpack.safetensors"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(PackError, match="does not match its sha256"):
        registry.activate(tmp_path / "out", task="sort")
    report = registry.doctor()
    assert not report.consistent and report.problems[0]["pack"] == ids["sort"]
    assert registry.activate(tmp_path / "fine", task="shift").is_dir()  # the other task is unaffected


def test_doctor_finds_and_repairs_leftovers(registry_factory, three_packs, finetuned: FineTune) -> None:
    registry = registry_factory()
    _add_all(registry, three_packs, finetuned, tasks=("shift",))
    orphan = registry.store.put(load_pack(three_packs["sort"]))  # stored, never recorded: a crash before commit
    registry.store.incoming("pull")  # an interrupted pull
    report = registry.doctor()
    assert report.consistent and report.orphans == (orphan,) and len(report.leftovers) == 1
    repaired = registry.doctor(repair=True)
    assert len(repaired.repaired) == 2 and registry.doctor().orphans == ()
    assert registry.add(three_packs["sort"], task="sort").state == "active"  # a retry after a crash succeeds


def test_schema_invalid_manifest_is_refused(registry_factory, three_packs, finetuned: FineTune,
                                            tmp_path: Path) -> None:
    import shutil

    registry = registry_factory()
    broken = Path(shutil.copytree(three_packs["shift"], tmp_path / "broken"))
    manifest = json.loads((broken / "skillpack.json").read_text())
    manifest["format_version"] = 7
    (broken / "skillpack.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="fails the skillpack schema at format_version"):
        registry.add(broken, task="shift")
    assert registry.list_packs() == [] and list(registry.store.addresses()) == []
