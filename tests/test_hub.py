"""Publishing and pulling SkillPacks with the real huggingface_hub client against the fake Hub
(tests/hubserver.py, started by conftest at HF_ENDPOINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, constants

from conftest import HUB_TOKENS, copy_tree, edit_tensors
from hubserver import FakeHub
from skillhub.cli import main
from skillhub.errors import HubError, MismatchError, PackError
from skillhub.pack.format import load_pack, sha256_file
from skillhub.registry.front import Registry
from skillhub.sharing import pull_pack, push_lineage, push_pack

ALICE, BOB = sorted(HUB_TOKENS, key=HUB_TOKENS.get)
PACK_FILES = ("skillpack.json", "skillpack.safetensors", "README.md")


@pytest.fixture(autouse=True)
def as_alice(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Alice's token in HF_TOKEN (how users authenticate) and a fresh client cache per test."""
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield
    assert hub.errors == [], "\n".join(hub.errors)


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def registered(registry: Registry, pack_dir: Path, task: str | None = None) -> dict[str, Any]:
    return registry.add(pack_dir, task=task)


def api(token: str | bool | None = None) -> HfApi:
    return HfApi(token=token if token is not None else ALICE)


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(directory.glob("*.safetensors"))} if directory.is_dir() else {}


# --------------------------------------------------------------------------- push, then pull


def test_push_then_pull_into_a_fresh_registry_gives_every_byte_back(paper_pack, finetuned, tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    entry = registered(source, paper_pack.path)
    pushed = cli("--registry", str(tmp_path / "source"), "push", entry.id, "--repo", "alice/shift", "--json")
    assert pushed.exit_code == 0, pushed.output
    result = json.loads(pushed.output)
    assert (result["tag"], result["unchanged"], result["sha256"]) == ("v1.0.0", False, entry.sha256)

    # The Hub holds the pack, its card with Hub metadata, and the version tag on the commit.
    info = api().model_info("alice/shift")
    assert info.sha == result["commit"]
    assert {s.rfilename for s in info.siblings} >= set(PACK_FILES)
    card = info.card_data
    assert card["library_name"] == "skillhub" and card["base_model_relation"] == "adapter"
    assert card["base_model"] == paper_pack.manifest["base"]["id"]
    assert {"task:shift", "operator:svd-mixed", "operator:magnitude-prune"} <= set(card["tags"])
    refs = api().list_repo_refs("alice/shift")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0.0", result["commit"])]

    pulled = cli("--registry", str(tmp_path / "target"), "pull", "alice/shift", "--json")
    assert pulled.exit_code == 0, pulled.output
    document = json.loads(pulled.output)
    assert [p["status"] for p in document["packs"]] == ["added"]
    assert document["commit"] == result["commit"]
    target = Registry(tmp_path / "target")
    [listed] = target.list_packs()
    assert listed.sha256 == entry.sha256 and listed.task == "shift"
    stored = target.store.path(listed.sha256)
    for name in ("skillpack.safetensors", "README.md"):
        assert (stored / name).read_bytes() == (paper_pack.path / name).read_bytes(), name
    manifest = json.loads((stored / "skillpack.json").read_text())
    assert manifest.pop("source") == {"repo": "alice/shift", "revision": "main", "commit": result["commit"], "path": ""}
    assert manifest == json.loads((paper_pack.path / "skillpack.json").read_text())
    assert target.show(listed.id).manifest["source"]["commit"] == result["commit"]

    # Activating the pulled pack gives the same weights, bit for bit, as activating the original.
    for registry, out in ((source, tmp_path / "a"), (target, tmp_path / "b")):
        registry.activate(out, task="shift", base_location=str(finetuned.base))
    assert tensors_of(tmp_path / "a").keys() == tensors_of(tmp_path / "b").keys()
    for name, weights in tensors_of(tmp_path / "a").items():
        for key, value in weights.items():
            assert torch.equal(value, tensors_of(tmp_path / "b")[name][key]), key


def test_pushing_again_is_idempotent_and_a_version_is_published_once(paper_pack, three_packs, tmp_path: Path) -> None:
    first = push_pack(paper_pack.path, "alice/once")
    again = push_pack(paper_pack.path, "alice/once")
    assert again["unchanged"] and again["commit"] == first["commit"]
    other = copy_tree(three_packs["reverse"], tmp_path / "reverse")  # also version 1.0.0, other content
    with pytest.raises(HubError, match="already has tag v1.0.0 for another pack .* publish this one under a new version"):
        push_pack(other, "alice/once")
    assert api().model_info("alice/once").sha == first["commit"]


def test_pull_at_a_tag_and_at_a_commit_id(paper_pack, finetuned, tmp_path: Path) -> None:
    from skillhub import create_pack

    first = push_pack(paper_pack.path, "alice/versions")
    second_pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / "v2", task="shift", version="2.0.0",
                              recipe={"name": "r", "rules": [{"match": {"pattern": "."}, "operator": "rtn"}]})
    second = push_pack(second_pack, "alice/versions")
    assert second["commit"] != first["commit"]

    for reference, expected in [("alice/versions", second), ("alice/versions@v1.0.0", first),
                                (f"alice/versions@{first['commit']}", first), ("alice/versions@v2.0.0", second)]:
        registry = Registry(tmp_path / f"r-{len(list(tmp_path.iterdir()))}")
        result = pull_pack(reference, registry=registry)
        [entry] = registry.list_packs()
        assert entry.sha256 == expected["sha256"], reference
        source = registry.show(entry.id).manifest["source"]
        assert source["commit"] == expected["commit"] == result.commit
        assert source["revision"] == (reference.split("@")[1] if "@" in reference else "main")


def test_push_to_a_new_branch_and_pull_it(paper_pack, tmp_path: Path) -> None:
    result = push_pack(paper_pack.path, "alice/branches", revision="dev", message="first on dev")
    branches = {b.name: b.target_commit for b in api().list_repo_refs("alice/branches").branches}
    assert branches["dev"] == result["commit"] and result["revision"] == "dev"
    registry = Registry(tmp_path / "r")
    assert pull_pack("alice/branches@dev", registry=registry).commit == result["commit"]


def test_pull_without_registering_writes_a_verified_pack(paper_pack, tmp_path: Path) -> None:
    push_pack(paper_pack.path, "alice/plain")
    result = cli("pull", "alice/plain", "--no-register", "-o", str(tmp_path / "copy"))
    assert result.exit_code == 0, result.output
    pulled = load_pack(tmp_path / "copy")  # sha256 verified
    assert pulled.manifest["source"]["repo"] == "alice/plain"
    assert sha256_file(tmp_path / "copy" / "skillpack.safetensors") == sha256_file(paper_pack.path / "skillpack.safetensors")
    assert Registry().list_packs() == []
    again = cli("pull", "alice/plain", "--no-register", "-o", str(tmp_path / "copy"))
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    assert cli("pull", "alice/plain", "--no-register", "-o", str(tmp_path / "copy"), "--force").exit_code == 0
    assert cli("pull", "alice/plain", "--force").exit_code == 2  # --force only replaces a --no-register output


def test_pull_downloads_only_what_the_pack_needs(hub: FakeHub, paper_pack, tmp_path: Path) -> None:
    push_pack(paper_pack.path, "alice/extras")
    (tmp_path / "notes.bin").write_bytes(os.urandom(2_000_000))
    api().upload_file(path_or_fileobj=str(tmp_path / "notes.bin"), path_in_repo="extras/notes.bin",
                      repo_id="alice/extras")
    hub.clear_requests_log()
    pull_pack("alice/extras", registry=Registry(tmp_path / "r"))
    assert sorted(hub.downloaded_files("alice/extras")) == sorted(PACK_FILES)


# --------------------------------------------------------------------------- lineage


def test_push_a_lineage_of_three_packs_and_pull_it_in_order(registry_factory, three_packs, finetuned,
                                                            tmp_path: Path) -> None:
    source = registry_factory()
    entries = [source.add(three_packs[t]) for t in ("shift", "reverse", "sort")]
    source.set_task("shift-and-sort", [entries[0].id, entries[2].id])
    repo = f"alice/lineage-{tmp_path.name[-12:]}"
    pushed = push_lineage(repo, registry=source)
    lineage = pushed["lineage"]
    assert [p["path"] for p in lineage["packs"]] == ["shift-1.0.0", "reverse-1.0.0", "sort-1.0.0"]
    assert lineage["tasks"] == {"shift-and-sort": ["shift-1.0.0", "sort-1.0.0"]}
    files = {s.rfilename for s in api().model_info(repo).siblings}
    assert {"lineage.json", "README.md"} <= files
    assert {f"{folder}/{name}" for folder in ("shift-1.0.0", "reverse-1.0.0", "sort-1.0.0") for name in PACK_FILES} <= files
    assert api().model_info(repo).card_data["library_name"] == "skillhub"

    target = registry_factory()
    result = pull_pack(repo, registry=target)
    assert [(p.path, p.status) for p in result.packs] == [
        ("shift-1.0.0", "added"), ("reverse-1.0.0", "added"), ("sort-1.0.0", "added")]
    assert [(e.name, e.sha256, e.position) for e in target.list_packs()] == \
        [(e.name, e.sha256, e.position) for e in source.list_packs()]
    assert {t.name: t.packs for t in target.tasks()} == {t.name: t.packs for t in source.tasks()}
    assert [e.kind for e in target.log()][-4:] == ["add", "add", "add", "task-set"]

    # Pulling again adds nothing; every task activates to the same weights as in the source.
    assert [p.status for p in pull_pack(repo, registry=target).packs] == ["present"] * 3
    for task in ("reverse", "shift-and-sort"):
        source.activate(tmp_path / f"s-{task}", task=task, base_location=str(finetuned.base))
        target.activate(tmp_path / f"t-{task}", task=task, base_location=str(finetuned.base))
        for name, weights in tensors_of(tmp_path / f"s-{task}").items():
            other = tensors_of(tmp_path / f"t-{task}")[name]
            assert all(torch.equal(v, other[k]) for k, v in weights.items()), task


def test_a_lineage_with_one_tampered_pack_registers_none_of_them(hub: FakeHub, three_packs, tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    for task in ("shift", "reverse", "sort"):
        source.add(three_packs[task])
    push_lineage("alice/tampered-lineage", registry=source)
    hub.tamper("alice/tampered-lineage", "sort-1.0.0/skillpack.safetensors")
    target = Registry(tmp_path / "target")
    result = cli("--registry", str(tmp_path / "target"), "pull", "alice/tampered-lineage")
    assert result.exit_code == 1
    assert "sort-1.0.0/skillpack.safetensors does not match the sha256 and size in its manifest" in result.output
    assert target.list_packs() == [] and target.log() == []
    assert list(target.store.addresses()) == [] and target.store.leftovers() == []


# --------------------------------------------------------------------------- integrity and safety


def test_a_tampered_file_is_detected(hub: FakeHub, paper_pack, tmp_path: Path) -> None:
    push_pack(paper_pack.path, "alice/tampered")
    hub.tamper("alice/tampered", "skillpack.safetensors")
    registry = Registry(tmp_path / "r")
    with pytest.raises(PackError, match="was damaged or tampered with; nothing was registered"):
        pull_pack("alice/tampered", registry=registry)
    assert registry.list_packs() == [] and list(registry.store.addresses()) == []
    assert registry.store.leftovers() == []
    with pytest.raises(PackError, match="tampered"):
        pull_pack("alice/tampered", register=False, output=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def upload_raw(repo: str, files: dict[str, bytes]) -> None:
    api().create_repo(repo, exist_ok=True)
    api().create_commit(repo, [CommitOperationAdd(path_in_repo=n, path_or_fileobj=d) for n, d in files.items()],
                        commit_message="crafted")


def test_a_manifest_naming_a_path_outside_the_pack_is_refused(paper_pack, tmp_path: Path) -> None:
    manifest = json.loads((paper_pack.path / "skillpack.json").read_text())
    stolen = {"bytes": 5, "sha256": "0" * 64}
    manifest["files"]["../../escaped.txt"] = stolen
    files = {name: (paper_pack.path / name).read_bytes() for name in PACK_FILES}
    files["skillpack.json"] = json.dumps(manifest).encode()
    files["../../escaped.txt"[6:]] = b"hello"
    upload_raw("alice/escape", files)
    registry = Registry(tmp_path / "r")
    result = cli("--registry", str(tmp_path / "r"), "pull", "alice/escape")
    assert result.exit_code == 1
    # The schema allows only plain file names (and the pull checks names again before any download).
    assert "skillpack.json fails the skillpack schema at files: '../../escaped.txt' does not match" in result.output
    assert not list(tmp_path.rglob("escaped.txt")) and registry.list_packs() == []


def test_a_lineage_naming_a_folder_outside_the_repo_is_refused(three_packs, tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    source.add(three_packs["shift"])
    push_lineage("alice/escape-lineage", registry=source)
    lineage = json.loads((Path(api().hf_hub_download("alice/escape-lineage", "lineage.json"))).read_text())
    lineage["packs"][0]["path"] = "../shift-1.0.0"
    upload_raw("alice/escape-lineage", {"lineage.json": json.dumps(lineage).encode()})
    with pytest.raises(PackError, match="lineage.json of alice/escape-lineage@main fails the lineage schema at packs/0/path"):
        pull_pack("alice/escape-lineage", registry=Registry(tmp_path / "r"))


@pytest.mark.parametrize("path", ["../x", "a/../../b"])
def test_a_path_option_cannot_climb_out_of_the_repo(path: str) -> None:
    result = cli("pull", "alice/shift", "--path", path)
    assert result.exit_code == 1 and "must be a folder inside the repo" in result.output


def test_a_pack_for_another_base_is_refused_before_its_weights_are_downloaded(
        hub: FakeHub, paper_pack, finetuned, tmp_path: Path) -> None:
    from skillhub import create_pack

    other_base = copy_tree(finetuned.base, tmp_path / "other-base")
    edit_tensors(other_base, lambda tensors: tensors["model.norm.weight"].add_(1e-3))
    registry = Registry(tmp_path / "r")
    registry.add(create_pack(other_base, finetuned.tuned, tmp_path / "other", task="other"))
    push_pack(paper_pack.path, "alice/other-base")
    hub.clear_requests_log()
    with pytest.raises(MismatchError, match="pass --new-base"):
        pull_pack("alice/other-base", registry=registry)
    assert hub.downloaded_files("alice/other-base") == ["skillpack.json"]
    assert len(registry.list_packs()) == 1
    pull_pack("alice/other-base", registry=registry, new_base=True)
    assert len(registry.list_packs()) == 2


def test_an_interrupted_pull_registers_nothing(paper_pack, tmp_path: Path) -> None:
    push_pack(paper_pack.path, "alice/interrupted")
    registry = Registry(tmp_path / "r")

    def interrupt(name: str, done: int, total: int) -> None:
        if name == "skillpack.safetensors":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull_pack("alice/interrupted", registry=registry, progress=interrupt)
    assert registry.list_packs() == [] and list(registry.store.addresses()) == [] and registry.store.leftovers() == []


KILLED_PULL = """
import os, signal, sys
from skillhub.registry.front import Registry
from skillhub.sharing import pull_pack

def die(name, done, total):
    if name == "skillpack.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)

pull_pack(sys.argv[1], registry=Registry(sys.argv[2]), progress=die)
"""


def test_a_killed_pull_leaves_nothing_that_doctor_does_not_clean(paper_pack, tmp_path: Path) -> None:
    push_pack(paper_pack.path, "alice/killed")
    process = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_PULL), "alice/killed", str(tmp_path / "r")],
                             capture_output=True, text=True, env=os.environ)
    assert process.returncode == -signal.SIGKILL, process.stderr
    registry = Registry(tmp_path / "r")
    assert registry.list_packs() == [] and list(registry.store.addresses()) == []
    assert len(registry.store.leftovers()) == 1  # the half-downloaded pull, outside the store proper
    report = registry.doctor(repair=True)
    assert registry.store.leftovers() == [] and report is not None
    assert pull_pack("alice/killed", registry=registry).packs[0].status == "added"


# --------------------------------------------------------------------------- authentication and Hub errors


def test_a_missing_repo_gives_the_documented_error() -> None:
    result = cli("pull", "alice/no-such-repo")
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: Hub repo alice/no-such-repo not found (or private): check the name, "
                                     "or set HF_TOKEN to a token that can read it")


def test_a_missing_revision_and_a_repo_without_a_pack(paper_pack) -> None:
    push_pack(paper_pack.path, "alice/revs")
    result = cli("pull", "alice/revs@no-such-branch")
    assert result.exit_code == 1 and "revision 'no-such-branch' not found in alice/revs" in result.output
    upload_raw("alice/not-a-pack", {"notes.txt": b"hello"})
    result = cli("pull", "alice/not-a-pack")
    assert result.exit_code == 1 and "holds no skillpack.json or lineage.json: pass --path FOLDER" in result.output


def test_private_repos_need_the_owners_token(paper_pack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("push", str(paper_pack.path), "--repo", "alice/private", "--private")
    assert result.exit_code == 0, result.output
    assert api().model_info("alice/private").private
    for token in (None, BOB):
        if token is None:
            monkeypatch.delenv("HF_TOKEN")
        else:
            monkeypatch.setenv("HF_TOKEN", token)
        denied = cli("--registry", str(tmp_path / "r"), "pull", "alice/private")
        assert denied.exit_code == 1 and "not found (or private)" in denied.output
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert cli("--registry", str(tmp_path / "r"), "pull", "alice/private").exit_code == 0


def test_writing_to_someone_elses_namespace_and_bad_tokens(paper_pack, monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("push", str(paper_pack.path), "--repo", "bob/mine")
    assert result.exit_code == 1 and "may not write to bob/mine" in result.output
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    result = cli("pull", "alice/anything")
    assert result.exit_code == 1
    assert "refused the credentials" in result.output and "set HF_TOKEN or run `hf auth login`" in result.output
    assert "hf_not_a_valid_token" not in result.output


def test_gated_repos_say_what_to_do(hub: FakeHub, paper_pack) -> None:
    push_pack(paper_pack.path, "alice/gated")
    hub.make_gated("alice/gated")
    result = cli("pull", "alice/gated")
    assert result.exit_code == 1 and "alice/gated@main is gated: accept its terms on the Hub, then set HF_TOKEN" in result.output


def test_an_unreachable_hub_is_a_network_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubserver import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    result = cli("pull", "alice/shift")
    assert result.exit_code == 1 and "cannot reach the Hub at http://127.0.0.1:" in result.output
    assert "check the network or HF_ENDPOINT" in result.output


def test_tokens_are_never_printed_or_stored(paper_pack, tmp_path: Path) -> None:
    outputs = [cli("-vv", "--registry", str(tmp_path / "r"), "push", str(paper_pack.path), "--repo", "alice/secret"),
               cli("-vv", "--registry", str(tmp_path / "r"), "pull", "alice/secret", "--json"),
               cli("-vv", "--registry", str(tmp_path / "r"), "pull", "alice/secret@nope")]
    for result in outputs:
        assert ALICE not in result.output
    for path in (tmp_path / "r").rglob("*"):
        if path.is_file():
            assert ALICE.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("reference", ["alice", "alice/x/y", "../x", "alice/x@", "alice/.."])
def test_bad_repo_references_are_refused(reference: str) -> None:
    result = cli("pull", reference)
    assert result.exit_code == 1 and "Error:" in result.output


def test_push_needs_a_pack_or_lineage() -> None:
    assert cli("push", "--repo", "alice/x").exit_code == 2
    assert cli("push", "abc", "--lineage", "--repo", "alice/x").exit_code == 2


# --------------------------------------------------------------------------- Hub ids as base models


def test_a_hub_model_id_works_as_base_and_tuned(finetuned, tmp_path: Path) -> None:
    from skillhub import create_pack

    for repo, folder in (("alice/tiny-base", finetuned.base), ("alice/tiny-tuned", finetuned.tuned)):
        api().create_repo(repo, exist_ok=True)
        api().upload_folder(repo_id=repo, folder_path=str(folder))
    pack = create_pack("alice/tiny-base", "alice/tiny-tuned", tmp_path / "from-hub", task="shift")
    base = pack.manifest["base"]
    assert base["id"] == "alice/tiny-base" and len(base["revision"]) == 40
    local = create_pack(finetuned.base, finetuned.tuned, tmp_path / "local", task="shift")
    assert base["fingerprint"] == local.manifest["base"]["fingerprint"]
    # The same tensors (the manifests differ only in where the base came from).
    assert pack.modules.keys() == local.modules.keys()
    for module in pack.modules:
        assert all(torch.equal(t, local.fields(module)[f]) for f, t in pack.fields(module).items()), module


def test_a_hub_model_id_works_as_a_graft_source(grafting, tmp_path: Path) -> None:
    api().create_repo("alice/gpt2-rot", exist_ok=True)
    api().upload_folder(repo_id="alice/gpt2-rot", folder_path=str(grafting.source))
    result = cli("graft", "alice/gpt2-rot", str(grafting.target), "--prompts", str(grafting.few), "-o",
                 str(tmp_path / "rot"), "--max-new-tokens", "8", "--sft-lr", "5e-4", "--sft-steps", "3",
                 "--pairs", "none", "--json")
    assert result.exit_code == 0, result.output
    source = json.loads((tmp_path / "rot" / "skillpack.json").read_text())["graft"]["source"]
    assert source["id"] == "alice/gpt2-rot" and len(source["revision"]) == 40
    assert source["architecture"] == "GPT2LMHeadModel"
    scored = [json.loads(line) for line in (tmp_path / "rot.graft" / "scores.jsonl").read_text().splitlines()]
    assert sum(map(sum, (r["scores"] for r in scored))) > 0  # the downloaded source really answers
