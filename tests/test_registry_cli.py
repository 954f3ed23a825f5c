"""Registry commands through the CLI, crash safety under SIGKILL, and concurrent adds on SQLite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillhub import create_pack
from skillhub.cli import main
from skillhub.io.checkpoint import Checkpoint, fingerprint

from conftest import FineTune

TESTS = Path(__file__).parent


def run(registry: Path, *args: object):
    return CliRunner().invoke(main, ["--registry", str(registry), *map(str, args)], catch_exceptions=False)


def test_every_registry_command(three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    assert run(registry, "init").exit_code == 0
    ids = {}
    for task in ("shift", "reverse"):
        result = run(registry, "add", three_packs[task], "--task", task, "--base-location", finetuned.base, "--json")
        assert result.exit_code == 0, result.output
        ids[task] = json.loads(result.stdout)["id"]
    made = run(registry, "add", "--from", finetuned.base, finetuned.tuned, "--task", "shift-again", "--recipe", "paper")
    assert made.exit_code == 0 and "for task shift-again of base base" in made.stdout

    listed = json.loads(run(registry, "--json", "list").stdout)
    assert [p["task"] for p in listed] == ["shift", "reverse", "shift-again"]
    assert "shift-again" in run(registry, "list").stdout
    shown = json.loads(run(registry, "show", ids["shift"][:8], "--json").stdout)
    assert shown["id"] == ids["shift"] and shown["in_tasks"] == ["shift"] and shown["manifest"]["task"] == "shift"
    tasks = json.loads(run(registry, "task", "list", "--json").stdout)
    assert {t["name"]: t["packs"] for t in tasks}["reverse"] == [ids["reverse"]]
    assert run(registry, "task", "set", "combo", "--packs", f"{ids['shift']},{ids['reverse']}").exit_code == 0

    out = tmp_path / "combo-model"
    assert run(registry, "activate", "--task", "combo", "-o", out).exit_code == 0
    from skillhub import apply_packs

    reference = apply_packs(finetuned.base, [three_packs["shift"], three_packs["reverse"]], tmp_path / "ref")
    assert fingerprint(Checkpoint(out)) == fingerprint(Checkpoint(reference))

    assert run(registry, "remove", ids["reverse"], "--purge").exit_code == 0
    events = json.loads(run(registry, "log", "--json").stdout)
    assert [e["kind"] for e in events] == ["base", "add", "add", "add", "task-set", "remove", "purge"]
    assert "remove" in run(registry, "log").stdout
    doctor = run(registry, "doctor", "--json")
    assert doctor.exit_code == 0 and json.loads(doctor.stdout)["consistent"]


@pytest.mark.parametrize(("case", "message"), [
    ("unknown pack", "Error: no pack 'fedcba' in the registry; `skillhub list` shows the pack ids"),
    ("unknown task", "Error: no task 'juggling' for base base; known: shift; `skillhub task list` shows the tasks"),
    ("other base", "Error: the pack was made for base other-base"),
    ("corrupt blob", "does not match its sha256 in the manifest: the pack is corrupt"),
    ("unwritable", "Error: cannot use registry"),
    ("bad manifest", "fails the skillpack schema at task"),
])
def test_bad_input_exits_1_and_changes_nothing(three_packs, finetuned: FineTune, tmp_path: Path, case: str,
                                               message: str) -> None:
    registry = tmp_path / "registry"
    pack_id = json.loads(run(registry, "add", three_packs["shift"], "--task", "shift", "--base-location",
                             finetuned.base, "--json").stdout)["id"]
    before = run(registry, "log", "--json").stdout
    if case == "unknown pack":
        result = run(registry, "remove", "fedcba")
    elif case == "unknown task":
        result = run(registry, "activate", "--task", "juggling", "-o", tmp_path / "out")
    elif case == "other base":
        from skillhub.demo.synthetic import build_tiny_model

        other = build_tiny_model(tmp_path / "other-base", seed=3)
        result = run(registry, "add", create_pack(other, finetuned.tuned, tmp_path / "p", task="x").path, "--task", "x")
    elif case == "corrupt blob":
        stored = next((registry / "packs").glob("*/*/skillpack.safetensors"))
        stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
        result = run(registry, "activate", "--task", "shift", "-o", tmp_path / "out")
        assert run(registry, "doctor").exit_code == 1
    elif case == "unwritable":
        result = run(Path("/proc/skillhub-registry"), "list")
    else:
        broken = Path(shutil.copytree(three_packs["reverse"], tmp_path / "broken"))
        manifest = json.loads((broken / "skillpack.json").read_text())
        manifest["task"] = "no spaces allowed"
        (broken / "skillpack.json").write_text(json.dumps(manifest))
        result = run(registry, "add", broken, "--task", "reverse")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert run(registry, "log", "--json").stdout == before
    assert not (tmp_path / "out").exists()
    assert pack_id


def _skillhub(registry: Path, *args: object, crash: tuple[str, int] | None = None) -> subprocess.Popen:
    prefix = [sys.executable, str(TESTS / "crash_add.py"), crash[0], str(crash[1])] if crash else \
        [sys.executable, "-m", "skillhub"]
    return subprocess.Popen([*prefix, "--registry", str(registry), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})


# Where `add` is killed: while copying files into the store, just before the stored copy is
# renamed into place, just before the database commit, and after the commit (reporting).
CRASH_POINTS = [("fsync", 2), ("rename", 1), ("commit", 2), ("echo", 1)]


@pytest.mark.parametrize("point", CRASH_POINTS, ids=[p[0] for p in CRASH_POINTS])
def test_add_killed_midway_leaves_a_consistent_registry(three_packs, finetuned: FineTune, tmp_path: Path,
                                                        point: tuple[str, int]) -> None:
    registry = tmp_path / "registry"
    assert run(registry, "add", three_packs["shift"], "--task", "shift").exit_code == 0
    process = _skillhub(registry, "add", three_packs["reverse"], "--task", "reverse", crash=point)
    process.communicate(timeout=300)
    assert process.returncode == -9  # really killed at that point

    report = json.loads(run(registry, "doctor", "--json").stdout)
    assert report["consistent"], report
    listed = [p["task"] for p in json.loads(run(registry, "list", "--json").stdout)]
    events = [e["kind"] for e in json.loads(run(registry, "log", "--json").stdout)]
    if point[0] == "echo":  # killed after the commit, while reporting: fully present
        assert listed == ["shift", "reverse"] and events == ["base", "add", "add"]
    else:  # killed before it: absent, at most a stored copy that doctor calls a leftover
        assert listed == ["shift"] and events == ["base", "add"]
        retry = run(registry, "add", three_packs["reverse"], "--task", "reverse")
        assert retry.exit_code == 0, retry.output
        assert [p["task"] for p in json.loads(run(registry, "list", "--json").stdout)] == ["shift", "reverse"]
        assert json.loads(run(registry, "doctor", "--repair", "--json").stdout)["consistent"]


# Opens a registry once the wall clock reaches argv[2], so that the processes collide.
_OPEN_AT = """
import sys, time
from skillhub.registry import Registry
start = float(sys.argv[2])
while time.time() < start:
    pass
Registry(sys.argv[1])
"""


def test_processes_opening_a_new_registry_together_all_open(tmp_path: Path) -> None:
    # Two connections switching a new SQLite file to WAL at once get "database is locked" without
    # any busy wait; before the retry, about one process in thirty failed here.
    for trial in range(8):
        start = time.time() + 2.0
        processes = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(tmp_path / f"r{trial}"), str(start)],
                                      stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr


def test_four_concurrent_adds_all_land(three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    fourth = create_pack(finetuned.base, finetuned.tuned, tmp_path / "fourth", task="shift4",
                         recipe={"name": "lr", "rules": [
                             {"match": {"role": ["attention", "mlp"]}, "operator": "lowrank", "params": {"rank": 4}},
                             {"match": {"pattern": "."}, "operator": "raw"}]}).path
    packs = [three_packs["shift"], three_packs["reverse"], three_packs["sort"], fourth]
    registry = tmp_path / "registry"
    processes = [_skillhub(registry, "add", pack, "--task", f"t{i}") for i, pack in enumerate(packs)]
    results = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr
        assert "locked" not in stderr
    listed = json.loads(run(registry, "list", "--json").stdout)
    assert sorted(p["task"] for p in listed) == ["t0", "t1", "t2", "t3"]
    assert sorted(p["position"] for p in listed) == [1, 2, 3, 4]
    assert [e["kind"] for e in json.loads(run(registry, "log", "--json").stdout)].count("add") == 4
