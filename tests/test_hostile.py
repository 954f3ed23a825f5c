"""Hostile and careless inputs, through the CLI as a user types them.

Every case gets a fresh world (base and tuned models, a pack, a registry holding it, a
working directory, a folder and a file of the user's own) and asserts the promise of the
README's Safety section: exit status 1, exactly one ``Error:`` line naming the problem, and
afterwards every file of the world byte for byte as before (nothing written, nothing
deleted), the registry's rows unchanged, and ``doctor`` consistent with nothing left over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import FineTune, copy_tree, edit_config
from skillhub.cli import main
from skillhub.pack.format import load_pack, sha256_file
from skillhub.registry.front import Registry
from skillhub.io.tensorfile import TensorFile

DEEP = "[" * 5000 + "]" * 5000  # deeper than Python's parser can recurse
SVD_MODULE = "model.layers.0.mlp.up_proj.weight"  # svd-mixed in the paper recipe
RAW_MODULE = "model.layers.0.input_layernorm.weight"  # raw float16
PRUNE_MODULE = "model.embed_tokens.weight"  # magnitude-prune


@dataclass
class World:
    root: Path
    base: Path
    tuned: Path
    pack: Path
    home: Path  # SKILLHUB_HOME: the default registry, its store and the write journal
    cwd: Path
    mine: Path  # a folder of the user's own
    mine_file: Path
    calib: Path
    evals: Path
    pack_id: str

    @property
    def store(self) -> Path:
        return self.home / "packs"


@pytest.fixture
def world(tmp_path: Path, finetuned: FineTune, paper_pack, monkeypatch: pytest.MonkeyPatch) -> World:
    root = tmp_path / "world"
    home = root / "home"
    monkeypatch.setenv("SKILLHUB_HOME", str(home))
    base = copy_tree(finetuned.base, root / "models" / "base")
    tuned = copy_tree(finetuned.tuned, root / "models" / "tuned")
    pack = copy_tree(paper_pack.path, root / "packs" / "shift")
    registry = Registry()
    entry = registry.add(pack, base_location=str(base))
    registry.engine.dispose()
    cwd = root / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    mine = root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my only copy")
    mine_file = root / "mine.txt"
    mine_file.write_text("also mine")
    evals = root / "shift-eval.jsonl"
    evals.write_text('{"prompt": "a", "answer": "b"}\n')
    return World(root=root, base=base, tuned=tuned, pack=pack, home=home, cwd=cwd, mine=mine, mine_file=mine_file,
                 calib=Path(shutil.copy(finetuned.calib, root / "calib.jsonl")), evals=evals, pack_id=entry.id)


def snapshot(world: World) -> tuple[dict[str, str], list[str]]:
    """Every path of the world with its content hash (database files aside), and the registry's rows."""
    files = {}
    for path in sorted(world.root.rglob("*")):
        name = str(path.relative_to(world.root))
        if path.name.startswith("registry.db"):
            continue
        if path.is_symlink():
            files[name] = "link " + os.readlink(path)
        elif path.is_fifo():
            files[name] = "fifo"
        elif path.is_dir():
            if path == world.home / "writes":
                continue  # the journal's folder may appear; an entry left in it would show below
            files[name] = "dir"
        else:
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    with sqlite3.connect(f"file:{world.home / 'registry.db'}?mode=ro", uri=True) as connection:
        rows = list(connection.iterdump())
    return files, rows


def invoke(*args: object, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def assert_refused(world: World, args: list[object], fragment: str, *, env: dict[str, str] | None = None,
                   subprocess_timeout: float | None = None) -> None:
    """Run ``skillhub *args`` and check the whole promise (see the module docstring)."""
    before = snapshot(world)
    if subprocess_timeout is None:
        result = invoke(*args, env=env)
        code, stderr = result.exit_code, result.stderr
    else:  # inputs that could block forever run in a child process with a deadline
        completed = subprocess.run([sys.executable, "-m", "skillhub", *map(str, args)], capture_output=True, text=True,
                                   timeout=subprocess_timeout, env={**os.environ, **(env or {})}, cwd=world.cwd)
        code, stderr = completed.returncode, completed.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert fragment in lines[0], lines[0]
    after = snapshot(world)
    changed = sorted(k for k in before[0].keys() | after[0].keys() if before[0].get(k) != after[0].get(k))
    assert not changed, f"the command changed these files: {changed}"
    assert after[1] == before[1], "the command changed registry rows"
    report = Registry().doctor()
    assert report.consistent and not report.orphans and not report.leftovers, report


# --------------------------------------------------------------------------- crafting hostile packs


def craft(world: World, name: str, *, manifest: Callable[[dict[str, Any]], None] | None = None,
          tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of the world's pack edited as an attacker would: manifest and tensors changed, then
    every size, the embedded manifest and the file hashes made consistent again."""
    target = copy_tree(world.pack, world.root / "crafted" / name)
    document = json.loads((target / "skillpack.json").read_text())
    source = TensorFile(target / "skillpack.safetensors")
    stored = {key: source.read(key).clone() for key in source.keys()}
    if manifest is not None:
        manifest(document)
    if tensors is not None:
        tensors(stored)
    for module, entry in document["modules"].items():
        keys = [f"{module}/{field}" for field in entry["fields"] if f"{module}/{field}" in stored]
        entry["stored_bytes"] = sum(stored[k].numel() * stored[k].element_size() for k in keys)
    core = {key: value for key, value in document.items() if key not in ("files", "source")}
    save_file(stored, target / "skillpack.safetensors",
              metadata={"skillpack": json.dumps(core, separators=(",", ":")), "format": "pt"})
    for file_name in document.get("files", {}):
        if (target / file_name).is_file():
            document["files"][file_name] = {"bytes": (target / file_name).stat().st_size,
                                            "sha256": sha256_file(target / file_name)}
    (target / "skillpack.json").write_text(json.dumps(document))
    return target


def module(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda document: change(document["modules"][name])


def tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(stored: dict[str, torch.Tensor]) -> None:
        stored[key] = change(stored[key])
    return edit


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.reshape(-1)[0] = float("nan")
    return t


def with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.reshape(-1)[0] = float("inf")
    return t


def drop_files(document: dict[str, Any]) -> None:
    document.pop("files")


# Packs that are damaged or hostile while still consistent on their face (hashes and sizes match).
HOSTILE_PACKS: dict[str, tuple[dict[str, Any], str]] = {
    "nan-values": ({"tensors": tensor(f"{RAW_MODULE}/values", with_nan)}, "decodes to NaN or Inf"),
    "inf-singular-value": ({"tensors": tensor(f"{SVD_MODULE}/S", with_inf)}, "decodes to NaN or Inf"),
    "values-as-float64": ({"tensors": tensor(f"{RAW_MODULE}/values", lambda t: t.double())},
                          "field values is stored as float64"),
    "codes-as-int32": ({"tensors": tensor(f"{SVD_MODULE}/U.codes", lambda t: t.to(torch.int32))},
                       "field U.codes is stored as int32"),
    "codes-cut-short": ({"tensors": tensor(f"{SVD_MODULE}/V.codes", lambda t: t[:-1].clone())},
                        "field V.codes is stored as uint8"),
    "scales-too-many": ({"tensors": tensor(f"{SVD_MODULE}/U.scales", lambda t: torch.cat([t, t[:1]]))},
                        "field U.scales is stored as float16"),
    "bits-0": ({"manifest": module(PRUNE_MODULE, lambda e: e["params"].update(bits=0))}, "bits"),
    "bits-64": ({"manifest": module(SVD_MODULE, lambda e: e["params"].update(groups=[[1, 64]]))}, "groups"),
    "group-size-0": ({"manifest": module(SVD_MODULE, lambda e: e["params"].update(group_size=0))}, "group_size"),
    "unknown-param": ({"manifest": module(RAW_MODULE, lambda e: e["params"].update(scale=2))}, "scale"),
    "missing-params": ({"manifest": module(SVD_MODULE, lambda e: e.update(params={}))}, "'groups' is a required"),
    "missing-meta": ({"manifest": module(SVD_MODULE, lambda e: e.update(meta={}))}, "meta does not fit"),
    "negative-rank": ({"manifest": module(SVD_MODULE, lambda e: e["meta"].update(rank=-3))}, "meta 'rank'"),
    "rank-beyond-matrix": ({"manifest": module(SVD_MODULE, lambda e: e["meta"].update(rank=10**6))}, "meta 'rank'"),
    "groups-disagree-with-rank": ({"manifest": module(SVD_MODULE, lambda e: e["meta"].update(groups=[[1, 8]]))},
                                  "meta 'groups' add up to rank 1"),
    "kept-beyond-tensor": ({"manifest": module(PRUNE_MODULE, lambda e: e["meta"].update(kept=10**9))},
                           "meta 'kept'"),
    "unknown-index": ({"manifest": module(PRUNE_MODULE, lambda e: e["meta"].update(index="zip"))}, "meta 'index'"),
    "field-renamed": ({"manifest": module(RAW_MODULE, lambda e: e.update(fields=["vals"])),
                       "tensors": lambda s: s.__setitem__(f"{RAW_MODULE}/vals", s.pop(f"{RAW_MODULE}/values"))},
                      "stores fields ['vals']"),
    "zero-fp16-bytes": ({"manifest": module(RAW_MODULE, lambda e: e.update(delta_fp16_bytes=0))},
                        "delta_fp16_bytes"),
    "no-files": ({"manifest": drop_files}, "lists no files"),
    "file-outside-pack": ({"manifest": lambda d: d["files"].update({"../x": {"bytes": 1, "sha256": "0" * 64}})},
                          "'../x' does not match"),
    "markup-and-escapes-in-base-id": ({"manifest": lambda d: d["base"].update(id="base\x1b[2J[/bold]")},
                                      "fails the skillpack schema at base/id"),
    "shape-1e400": ({"manifest": module(RAW_MODULE, lambda e: e.update(shape=[1e400]))}, "shape"),
}


@pytest.mark.parametrize("case", HOSTILE_PACKS, ids=str)
@pytest.mark.parametrize("command", ["add", "apply"])
def test_hostile_pack_is_refused(world: World, case: str, command: str) -> None:
    edits, fragment = HOSTILE_PACKS[case]
    pack = craft(world, case, **edits)
    args = (["add", pack, "--task", "evil"] if command == "add"
            else ["apply", world.base, pack, "-o", world.root / "out"])
    assert_refused(world, args, fragment)


def test_the_same_pack_twice_is_refused(world: World) -> None:
    assert_refused(world, ["apply", world.base, world.pack, world.pack, "-o", world.root / "out"], "is given twice")


# --------------------------------------------------------------------------- files that are not what they claim


def _deep_manifest(world: World) -> Path:
    pack = copy_tree(world.pack, world.root / "deep")
    (pack / "skillpack.json").write_text('{"a": ' + DEEP + "}")
    return pack


def _with_tensor_file(world: World, name: str, header: bytes, data: bytes = b"") -> Path:
    """A copy of the pack whose skillpack.safetensors is replaced, its size and sha256 in the manifest updated."""
    pack = copy_tree(world.pack, world.root / name)
    (pack / "skillpack.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)
    manifest = json.loads((pack / "skillpack.json").read_text())
    manifest["files"]["skillpack.safetensors"] = {"bytes": (pack / "skillpack.safetensors").stat().st_size,
                                                  "sha256": sha256_file(pack / "skillpack.safetensors")}
    (pack / "skillpack.json").write_text(json.dumps(manifest))
    return pack


def _manifest_as(world: World, name: str, make: Callable[[Path], None]) -> Path:
    """A copy of the pack whose skillpack.json is replaced by what ``make`` puts at its path."""
    pack = copy_tree(world.pack, world.root / name)
    (pack / "skillpack.json").unlink()
    make(pack / "skillpack.json")
    return pack


def _manifest_array(world: World) -> Path:
    return _manifest_as(world, "manifest-array", lambda path: path.write_text('[["format", "skillpack"]]'))


def _manifest_directory(world: World) -> Path:
    return _manifest_as(world, "manifest-dir", lambda path: path.mkdir())


def _directory(world: World, name: str) -> Path:
    (world.root / name).mkdir(exist_ok=True)
    return world.root / name


def _deep_header(world: World) -> Path:
    return _with_tensor_file(world, "deep-header", b'{"x": ' + DEEP.encode() + b"}")


def _header_shape(world: World) -> Path:
    header = b'{"x": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}'
    return _with_tensor_file(world, "huge-shape", header, b"\0" * 4)


FILE_CASES: dict[str, tuple[Callable[[World], list[object]], str]] = {
    "inspect-deep-manifest": (lambda w: ["inspect", _deep_manifest(w)], "nested too deeply"),
    "add-deep-manifest": (lambda w: ["add", _deep_manifest(w), "--task", "t"], "nested too deeply"),
    "apply-deep-manifest": (lambda w: ["apply", w.base, _deep_manifest(w), "-o", w.root / "o"], "nested too deeply"),
    "inspect-deep-header": (lambda w: ["inspect", _deep_header(w)], "nested too deeply"),
    "inspect-header-shape-1e400": (lambda w: ["inspect", _header_shape(w)], "bad header entry for tensor 'x'"),
    "create-config-architectures-5": (
        lambda w: ["create", edit_config(w.base, architectures=5), w.tuned, "-o", w.root / "o"],
        "'architectures' must be a list"),
    "create-config-deep": (lambda w: ["create", _write(w.base / "config.json", DEEP), w.tuned, "-o", w.root / "o"],
                           "nested too deeply"),
    "create-config-model-type-list": (
        lambda w: ["create", edit_config(w.tuned, model_type=["llama"]), w.base, "-o", w.root / "o"],
        "'model_type' must be a str"),
    "create-index-weight-map-list": (
        lambda w: ["create", _write(w.base / "model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}'),
                   w.tuned, "-o", w.root / "o"], "'weight_map' must map"),
    "create-index-shard-outside": (
        lambda w: ["create", _write(w.base / "model.safetensors.index.json",
                                    '{"weight_map": {"x": "../../tuned/model.safetensors"}}'),
                   w.tuned, "-o", w.root / "o"], "not a .safetensors file next to it"),
    "create-recipe-deep": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--recipe",
                                      _write(w.root / "recipe.json", DEEP)], "nested too deeply"),
    "create-recipe-name-with-escapes": (
        lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--recipe",
                   _write(w.root / "recipe.json", json.dumps({"name": "x\x1b[2J", "rules": []}))], "at name"),
    "create-calib-deep": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--calib",
                                     _write(w.root / "c.jsonl", '{"text": ' + DEEP + "}\n")], "nested too deeply"),
    "create-bad-name": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--name", "a\x1b[2Jb"],
                        "pack name"),
    "create-long-task": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--task", "t" * 100_000],
                         "task name"),
    "task-add-null-answer": (lambda w: ["task", "add", "shift", "--eval",
                                        _write(w.root / "e.jsonl", '{"prompt": "a", "answer": null}\n')],
                             "'answer' must be a string, not null"),
    "task-add-list-prompt": (lambda w: ["task", "add", "shift", "--eval",
                                        _write(w.root / "e.jsonl", '{"prompt": ["a"], "answer": "b"}\n')],
                             "'prompt' must be a string"),
    "task-add-deep": (lambda w: ["task", "add", "shift", "--eval",
                                 _write(w.root / "e.jsonl", '{"prompt": ' + DEEP + ', "answer": "b"}\n')],
                      "nested too deeply"),
    "task-add-bad-name": (lambda w: ["task", "add", "a b", "--eval", w.evals], "task name 'a b'"),
    # A document of the wrong shape, and a directory where a file is read (issue 27 section 3).
    "inspect-manifest-array": (lambda w: ["inspect", _manifest_array(w)], "must be a JSON object, not an array"),
    "add-manifest-array": (lambda w: ["add", _manifest_array(w), "--task", "t"], "must be a JSON object"),
    "apply-manifest-array": (lambda w: ["apply", w.base, _manifest_array(w), "-o", w.root / "o"],
                             "must be a JSON object"),
    "inspect-manifest-directory": (lambda w: ["inspect", _manifest_directory(w)], "skillpack.json is a directory"),
    "add-manifest-directory": (lambda w: ["add", _manifest_directory(w), "--task", "t"], "is a directory"),
    "apply-manifest-directory": (lambda w: ["apply", w.base, _manifest_directory(w), "-o", w.root / "o"],
                                 "is a directory"),
    "create-calib-directory": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--calib",
                                          _directory(w, "calib")], "is a directory: give a file"),
    "task-add-eval-directory": (lambda w: ["task", "add", "shift", "--eval", _directory(w, "evals")],
                                "is a directory: give a file"),
    "add-eval-directory": (lambda w: ["add", w.pack, "--task", "t", "--eval", _directory(w, "evals")],
                           "is a directory: give a file"),
    "create-recipe-array": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "o", "--recipe",
                                       _write(w.root / "recipe.json", "[]")], "must be a JSON object, not an array"),
    "create-config-string": (lambda w: ["create", _write(w.base / "config.json", '"llama"'), w.tuned, "-o",
                                        w.root / "o"], "must be a JSON object, not a string"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent if path.name in ("config.json", "model.safetensors.index.json") else path


@pytest.mark.parametrize("case", FILE_CASES, ids=str)
def test_broken_file_is_refused(world: World, case: str) -> None:
    make, fragment = FILE_CASES[case]
    assert_refused(world, make(world), fragment)


FIFO_CASES = {
    "inspect-fifo-tensors": (lambda w, p: ["inspect", p], "is not a regular file"),
    "add-fifo-tensors": (lambda w, p: ["add", p, "--task", "t"], "is not a regular file"),
    "apply-fifo-tensors": (lambda w, p: ["apply", w.base, p, "-o", w.root / "o"], "is not a regular file"),
}


@pytest.mark.parametrize("case", FIFO_CASES, ids=str)
def test_a_fifo_never_blocks(world: World, case: str) -> None:
    pack = copy_tree(world.pack, world.root / "fifo")
    (pack / "skillpack.safetensors").unlink()
    os.mkfifo(pack / "skillpack.safetensors")
    make, fragment = FIFO_CASES[case]
    assert_refused(world, make(world, pack), fragment, subprocess_timeout=120)


def test_a_fifo_manifest_and_eval_file_never_block(world: World) -> None:
    pack = copy_tree(world.pack, world.root / "fifo-manifest")
    (pack / "skillpack.json").unlink()
    os.mkfifo(pack / "skillpack.json")
    assert_refused(world, ["inspect", pack], "is not a regular file", subprocess_timeout=120)
    fifo = world.root / "eval.jsonl"
    os.mkfifo(fifo)
    assert_refused(world, ["task", "add", "shift", "--eval", fifo], "is not a regular file", subprocess_timeout=120)


def test_a_symlinked_pack_file_is_never_stored(world: World, three_packs) -> None:
    pack = copy_tree(three_packs["sort"], world.root / "linked")
    real = world.root / "elsewhere.safetensors"
    shutil.move(pack / "skillpack.safetensors", real)
    (pack / "skillpack.safetensors").symlink_to(real)
    assert_refused(world, ["add", pack, "--task", "t"], "is a symbolic link")


def test_only_the_files_a_manifest_names_are_stored(world: World) -> None:
    pack = copy_tree(world.pack, world.root / "extra")
    (pack / "secret.txt").write_text("not part of the pack")
    (pack / "id_rsa").symlink_to(world.mine_file)
    Registry().remove(world.pack_id, purge=True)
    result = invoke("add", pack, "--task", "shift", "--json")
    assert result.exit_code == 0, result.output
    stored = Registry().store.path(json.loads(result.stdout)["sha256"])
    assert sorted(p.name for p in stored.iterdir()) == ["README.md", "skillpack.json", "skillpack.safetensors"]


def test_markup_in_a_pack_is_shown_as_text(world: World) -> None:
    """Strings from a pack's files are printed literally: rich markup is not interpreted."""
    pack = craft(world, "markup", manifest=lambda d: d["recipe"].update(name="[/bold][red]x"))
    result = invoke("inspect", pack)
    assert result.exit_code == 0, result.output
    assert "recipe [/bold][red]x" in result.stdout


# --------------------------------------------------------------------------- never destroy inputs


OUTPUT_CASES: dict[str, tuple[Callable[[World], list[object]], str]] = {
    "create-onto-base": (lambda w: ["create", w.base, w.tuned, "-o", w.base, "--force"], "is "),
    "create-onto-tuned": (lambda w: ["create", w.base, w.tuned, "-o", w.tuned, "--force"], "is "),
    "create-inside-base": (lambda w: ["create", w.base, w.tuned, "-o", w.base / "pack"], "lies inside"),
    "create-around-inputs": (lambda w: ["create", w.base, w.tuned, "-o", w.root / "models", "--force"], "contains"),
    "create-onto-cwd": (lambda w: ["create", w.base, w.tuned, "-o", w.cwd, "--force"], "current directory"),
    "create-onto-dot": (lambda w: ["create", w.base, w.tuned, "-o", ".", "--force"], "current directory"),
    "create-onto-cwd-parent": (lambda w: ["create", w.base, w.tuned, "-o", "..", "--force"], "current directory"),
    "create-onto-user-folder": (lambda w: ["create", w.base, w.tuned, "-o", w.mine, "--force"],
                                "not written by skillhub"),
    "create-onto-user-file": (lambda w: ["create", w.base, w.tuned, "-o", w.mine_file, "--force"],
                              "not written by skillhub"),
    "create-onto-calib": (lambda w: ["create", w.base, w.tuned, "-o", w.calib, "--force", "--calib", w.calib], "is "),
    "create-onto-parent-pack": (lambda w: ["create", w.base, w.tuned, "-o", w.pack, "--force", "--parent", w.pack],
                                "is "),
    "create-into-registry-home": (lambda w: ["create", w.base, w.tuned, "-o", w.home / "p"], "lies inside"),
    "create-into-store": (lambda w: ["create", w.base, w.tuned, "-o", w.store / "p"], "lies inside"),
    "create-existing-no-force": (lambda w: ["create", w.base, w.tuned, "-o", w.pack], "already exists"),
    "create-onto-symlink": (lambda w: ["create", w.base, w.tuned, "-o", _link(w), "--force"], "symbolic link"),
    "apply-onto-base": (lambda w: ["apply", w.base, w.pack, "-o", w.base, "--force"], "is "),
    "apply-onto-pack": (lambda w: ["apply", w.base, w.pack, "-o", w.pack, "--force"], "is "),
    "apply-inside-pack": (lambda w: ["apply", w.base, w.pack, "-o", w.pack / "model"], "lies inside"),
    "apply-onto-dot": (lambda w: ["apply", w.base, w.pack, "-o", ".", "--force"], "current directory"),
    "apply-onto-user-folder": (lambda w: ["apply", w.base, w.pack, "-o", w.mine, "--force"], "not written by skillhub"),
    "apply-around-base": (lambda w: ["apply", w.base, w.pack, "-o", w.base.parent, "--force"], "contains"),
    "activate-onto-base-location": (lambda w: ["activate", "--task", "shift", "-o", w.base, "--force"], "is "),
    "activate-onto-registry": (lambda w: ["activate", "--task", "shift", "-o", w.home, "--force"], "contains"),
    "activate-onto-store": (lambda w: ["activate", "--task", "shift", "-o", w.store, "--force"], "contains"),
    "activate-into-store": (lambda w: ["activate", "--task", "shift", "-o", w.store / "model"], "lies inside"),
    "activate-onto-user-folder": (lambda w: ["activate", "--task", "shift", "-o", w.mine, "--force"],
                                  "not written by skillhub"),
    "demo-onto-user-folder": (lambda w: ["demo", "--tiny", "--fast", "--workdir", w.mine], "not written by skillhub"),
    "demo-onto-cwd": (lambda w: ["demo", "--tiny", "--fast", "--workdir", "."], "current directory"),
}


def _link(world: World) -> Path:
    link = world.root / "link-to-mine"
    link.symlink_to(world.mine)
    return link


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=str)
def test_outputs_never_destroy_inputs(world: World, case: str) -> None:
    make, fragment = OUTPUT_CASES[case]
    assert_refused(world, make(world), fragment)


def test_force_replaces_what_skillhub_wrote(world: World) -> None:
    """The other side of the rule: --force does replace skillhub's own earlier output."""
    out = world.root / "model"
    for _ in range(2):
        result = invoke("activate", "--task", "shift", "-o", out, "--force")
        assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not [p for p in world.root.iterdir() if p.name.startswith(".model.")]


# --------------------------------------------------------------------------- the registry


REGISTRY_CASES: dict[str, tuple[Callable[[World], list[object]], str]] = {
    "remove-underscore": (lambda w: ["remove", "_"], "no pack '_' in the registry (a pack id is hex digits"),
    "remove-percent": (lambda w: ["remove", "%"], "no pack '%' in the registry (a pack id is hex digits"),
    "show-percent": (lambda w: ["show", "%"], "no pack '%' in the registry (a pack id is hex digits"),
    "show-underscore-prefix": (lambda w: ["show", w.pack_id[:3] + "_"], "(a pack id is hex digits"),
    "activate-packs-percent": (lambda w: ["activate", "--packs", "%", "-o", w.root / "o"], "no pack '%' in the registry (a pack id is hex digits"),
    "task-set-percent": (lambda w: ["task", "set", "t", "--packs", "%"], "no pack '%' in the registry (a pack id is hex digits"),
    "remove-unknown": (lambda w: ["remove", "ffffffffffff"], "no pack 'ffffffffffff'"),
    "add-task-escape": (lambda w: ["add", w.pack, "--task", "\x1b[2J"], "task name"),
    "add-task-100kb": (lambda w: ["add", w.pack, "--task", "x" * 100_000], "task name"),
    "add-again": (lambda w: ["add", w.pack, "--task", "shift"], "already in the registry"),
    "task-set-escape": (lambda w: ["task", "set", "\x1b]0;pwned\x07", "--packs", w.pack_id], "task name"),
    "add-new-base-bad-name": (lambda w: ["--registry", _fresh_registry(w), "add", w.pack, "--task", "t",
                                         "--base", "a\nb"], "base name 'a\\nb' is not allowed"),
    "driver-missing": (lambda w: ["--registry", "postgresql+pg8000://u:secret@127.0.0.1/db", "list"],
                       "pip install 'skillhub[postgres]'"),
}


def _fresh_registry(world: World) -> Path:
    location = world.root / "fresh"
    Registry(location).engine.dispose()
    return location


@pytest.mark.parametrize("case", REGISTRY_CASES, ids=str)
def test_registry_misuse_is_refused(world: World, case: str) -> None:
    make, fragment = REGISTRY_CASES[case]
    assert_refused(world, make(world), fragment)


def test_the_driver_message_hides_the_password(world: World) -> None:
    result = invoke("--registry", "postgresql+pg8000://u:secret@127.0.0.1/db", "list")
    assert result.exit_code == 1 and "secret" not in result.output


def _newer(world: World) -> None:
    with sqlite3.connect(world.home / "registry.db") as connection:
        connection.execute("INSERT INTO skillhub_migrations VALUES ('m9999_from_the_future', '2030-01-01T00:00:00Z')")


@pytest.mark.parametrize("args,fragment", [
    (["add", "PACK", "--task", "other"], "upgraded by a newer skillhub"),
    (["remove", "ID"], "upgraded by a newer skillhub"),
    (["task", "set", "t", "--packs", "ID"], "upgraded by a newer skillhub"),
    (["task", "add", "shift", "--eval", "EVAL"], "upgraded by a newer skillhub"),
    (["doctor", "--repair"], "upgraded by a newer skillhub"),
], ids=["add", "remove", "task-set", "task-add", "doctor-repair"])
def test_a_newer_registry_is_read_but_never_written(world: World, args: list[str], fragment: str) -> None:
    _newer(world)
    replaced = {"PACK": world.pack, "ID": world.pack_id, "EVAL": world.evals}
    assert_refused(world, [replaced.get(a, a) for a in args], fragment)
    for reading in (["list", "--json"], ["show", world.pack_id], ["log"], ["doctor"]):
        assert invoke(*reading).exit_code == 0


# --------------------------------------------------------------------------- Hub repos


ALICE = "hf_alice_secret_token"


def _refused_with_hub(world: World, args: list[object], fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world.root.parent / "hf-cache"))
    assert_refused(world, args, fragment)


def _upload(repo: str, files: dict[str, bytes]) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=ALICE)
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd(path_in_repo=n, path_or_fileobj=d) for n, d in files.items()],
                      commit_message="crafted")


def _pack_files(pack: Path, folder: str = "") -> dict[str, bytes]:
    return {(f"{folder}/" if folder else "") + p.name: p.read_bytes()
            for p in pack.iterdir() if p.name in ("skillpack.json", "skillpack.safetensors", "README.md")}


def _lineage(world: World, folders: list[str], tasks: dict[str, list[str]] | None = None) -> bytes:
    manifest = json.loads((world.pack / "skillpack.json").read_text())
    sha = manifest["files"]["skillpack.safetensors"]["sha256"]
    return json.dumps({
        "format": "skillhub-lineage", "format_version": 1, "created_at": "2026-01-01T00:00:00Z",
        "skillhub_version": "0", "base": {"id": manifest["base"]["id"], "fingerprint": manifest["base"]["fingerprint"]},
        "packs": [{"path": f, "name": "shift", "version": "1.0.0", "task": "shift", "sha256": sha} for f in folders],
        "tasks": tasks or {},
    }).encode()


def _hub_case(name: str, world: World, other: Path) -> tuple[dict[str, bytes], list[object], str]:
    """Files of a hostile repo, extra pull arguments, the expected message. ``other`` is a pack the
    world's registry does not hold (a pull of a registered pack downloads nothing)."""
    manifest = json.loads((other / "skillpack.json").read_text())
    files = _pack_files(other)
    if name == "deep-manifest":
        files["skillpack.json"] = b'{"a": ' + DEEP.encode() + b"}"
        return files, [], "nested too deeply"
    if name == "oversized-lineage":
        return {"lineage.json": b" " * (5 * 1024 * 1024) + b"{}"}, [], "larger than the 4,194,304 bytes expected"
    if name == "deep-lineage":
        return {"lineage.json": b'{"a": ' + DEEP.encode() + b"}"}, [], "nested too deeply"
    if name == "lineage-folder-twice":
        return {"lineage.json": _lineage(world, ["a", "a"]), **_pack_files(world.pack, "a")}, [], "twice"
    if name == "lineage-over-the-limit":
        files = {"lineage.json": _lineage(world, ["a", "b", "c"])}
        return files, [], "more than the limit of 2"
    if name == "lineage-limit-not-a-number":
        return {"lineage.json": _lineage(world, ["a"])}, [], "SKILLHUB_MAX_LINEAGE_PACKS='many' is not"
    if name == "lineage-task-unknown-folder":
        lineage = _lineage(world, ["a"], {"shift": ["z"]})
        return {"lineage.json": lineage, **_pack_files(world.pack, "a")}, [], "names folder 'z'"
    if name == "lineage-task-escape":
        lineage = _lineage(world, ["a"], {"\x1b[2J": ["a"]})
        return {"lineage.json": lineage, **_pack_files(world.pack, "a")}, [], "fails the lineage schema"
    if name == "weights-longer-than-manifest":
        manifest["files"]["skillpack.safetensors"]["bytes"] -= 100
        files["skillpack.json"] = json.dumps(manifest).encode()
        return files, [], "is larger than the"
    if name == "manifest-names-itself":
        manifest["files"]["skillpack.json"] = {"bytes": 1, "sha256": "0" * 64}
        files["skillpack.json"] = json.dumps(manifest).encode()
        return files, [], "not a plain file name"
    if name == "manifest-without-files":
        manifest.pop("files")
        files["skillpack.json"] = json.dumps(manifest).encode()
        return files, [], "lists no files"
    if name == "no-register-onto-user-folder":
        return files, ["--no-register", "-o", world.mine, "--force"], "not written by skillhub"
    if name == "no-register-onto-dot":
        return files, ["--no-register", "-o", ".", "--force"], "current directory"
    raise AssertionError(name)


HUB_CASES = ["deep-manifest", "oversized-lineage", "deep-lineage", "lineage-folder-twice", "lineage-over-the-limit",
             "lineage-limit-not-a-number",
             "lineage-task-unknown-folder", "lineage-task-escape", "weights-longer-than-manifest",
             "manifest-names-itself", "manifest-without-files", "no-register-onto-user-folder", "no-register-onto-dot"]


@pytest.mark.parametrize("case", HUB_CASES, ids=str)
def test_hostile_hub_repo_is_refused(world: World, case: str, hub, three_packs,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files, extra, fragment = _hub_case(case, world, three_packs["reverse"])
    repo = f"alice/hostile-{case}"
    monkeypatch.setenv("SKILLHUB_MAX_LINEAGE_PACKS", "many" if case == "lineage-limit-not-a-number" else "2")
    _upload(repo, files)
    _refused_with_hub(world, ["pull", repo, *extra], fragment, monkeypatch)


def test_no_credentials_at_any_verbosity(world: World, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that echoes the Authorization header back: -vv logs response headers, never the token."""
    from huggingface_hub import constants

    _upload("alice/echo", _pack_files(world.pack))
    monkeypatch.setattr(hub, "echo_authorization", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world.root.parent / "hf-cache"))
    completed = subprocess.run([sys.executable, "-m", "skillhub", "-vv", "pull", "alice/echo", "--no-register",
                                "-o", world.root / "pulled"], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_TOKEN": ALICE}, cwd=world.cwd)
    assert completed.returncode == 0, completed.stderr
    assert "X-Echo-Authorization" in completed.stderr or "x-echo-authorization" in completed.stderr.lower()
    assert ALICE not in completed.stdout + completed.stderr
    assert "alice_secret" not in completed.stdout + completed.stderr


# --------------------------------------------------------------------------- the machine says no


def _namespace(*setup: str) -> list[str] | None:
    """A command prefix running in a private mount namespace after ``setup`` (shell), or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return [unshare, "-rm", "sh", "-c", " && ".join([*setup, 'exec "$@"']), "sh"]


def test_a_full_disk_is_named_and_leaves_nothing(world: World) -> None:
    target = world.root / "small-disk"
    target.mkdir()
    prefix = _namespace(f"mount -t tmpfs -o size=64k tmpfs {target}")
    if prefix is None:
        pytest.skip("needs unshare and tmpfs mounts (a private mount namespace) to make a full disk")
    completed = subprocess.run([*prefix, sys.executable, "-m", "skillhub", "apply", str(world.base), str(world.pack),
                                "-o", str(target / "model")], capture_output=True, text=True, timeout=300,
                               cwd=world.cwd)
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the disk is full"), completed.stderr
    assert str(target / "model") in lines[0]
    assert list(target.iterdir()) == []  # the tmpfs is gone with the namespace; the directory stayed empty
    assert not list((world.home / "writes").glob("*.json"))


def test_a_read_only_registry_can_be_read(world: World) -> None:
    prefix = _namespace(f"mount --bind {world.home} {world.home}", f"mount -o remount,bind,ro {world.home}")
    if prefix is None:
        pytest.skip("needs unshare and bind mounts (a private mount namespace) to make a read-only registry")
    before = snapshot(world)

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-m", "skillhub", *map(str, args)], capture_output=True,
                              text=True, timeout=300, cwd=world.cwd)

    listed = run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["id"] for p in json.loads(listed.stdout)] == [world.pack_id]
    for args in (["show", world.pack_id], ["log"], ["doctor"], ["task", "list"]):
        assert run(*args).returncode == 0, args
    removed = run("remove", world.pack_id)
    assert removed.returncode == 1 and removed.stderr.startswith("Error: cannot change the registry: "), removed.stderr
    assert "read-only" in removed.stderr
    assert snapshot(world) == before


def test_doctor_removes_what_a_killed_activate_left(world: World) -> None:
    """SIGKILL during activate: the hidden staging directory is found through the journal and removed."""
    script = (
        "import os, signal, sys\n"
        "import skillhub.activation as a\n"
        "real = a.TensorFileWriter.add\n"
        "def add(self, name, tensor):\n"
        "    real(self, name, tensor)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "a.TensorFileWriter.add = add\n"
        "from skillhub.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = world.root / "model"
    killed = subprocess.run([sys.executable, "-c", script, "activate", "--task", "shift", "-o", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=world.cwd)
    assert killed.returncode == -9, killed.stderr
    staging = [p for p in world.root.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(staging) == 1 and not out.exists()
    report = invoke("doctor", "--json")
    assert json.loads(report.stdout)["leftovers"] == [str(staging[0].resolve())]
    repaired = json.loads(invoke("doctor", "--repair", "--json").stdout)
    assert repaired["repaired"] == [f"deleted interrupted output {staging[0].resolve()}"]
    assert not staging[0].exists() and (world.mine / "notes.txt").read_text() == "my only copy"


def test_doctor_repair_touches_only_what_the_store_wrote(world: World, three_packs) -> None:
    """A --store shared with the user's files: only provable store entries and incoming writes go."""
    shared = world.root / "shared"
    lookalike = shared / "ab" / ("ab" + "0" * 62)
    lookalike.mkdir(parents=True)
    (lookalike / "thesis.tex").write_text("years of work")
    (shared / "cd").mkdir()
    (shared / "cd" / "cdnotes").write_text("mine")
    (shared / ".incoming").mkdir()
    (shared / ".incoming" / "photos").mkdir()
    registry = Registry(store=shared)
    orphan = registry.store.put(load_pack(three_packs["sort"]))  # stored, never recorded: a crash before commit
    report = invoke("--store", shared, "doctor", "--repair", "--json")
    repaired = json.loads(report.stdout)["repaired"]
    assert repaired == [f"deleted unreferenced stored pack {orphan[:12]}"]
    assert (lookalike / "thesis.tex").read_text() == "years of work"
    assert (shared / "cd" / "cdnotes").read_text() == "mine" and (shared / ".incoming" / "photos").is_dir()
    assert not registry.store.path(orphan).exists()


def test_an_unreachable_hub_is_called_unreachable(world: World) -> None:
    """Not "has no file": huggingface_hub reports a failed connection as a missing local entry."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = subprocess.run([sys.executable, "-m", "skillhub", "create", "alice/base", "alice/tuned", "-o",
                                str(world.root / "p")], capture_output=True, text=True, timeout=300, cwd=world.cwd,
                               env={**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "2",
                                    "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1 and len(lines) == 1, completed.stderr
    assert "cannot reach the Hub" in lines[0] and "has no file" not in lines[0], lines[0]
    assert not (world.root / "p").exists()
