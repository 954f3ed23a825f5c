"""The real huggingface_hub client, end to end, against the fake Hub in tests/hubserver.py (no skillhub code)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from conftest import HUB_TOKENS
from hubserver import DEFAULT_GITATTRIBUTES, FakeHub

ALICE, BOB = sorted(HUB_TOKENS, key=HUB_TOKENS.get)  # their tokens; the session's hub is in conftest
MB = 1000 * 1000


@pytest.fixture(autouse=True)
def online(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test gets its own client cache; the server must not have hit a bug of its own."""
    # conftest set HF_ENDPOINT and HF_HUB_DISABLE_XET before huggingface_hub was imported.
    assert constants.ENDPOINT == hub.url and constants.HF_HUB_DISABLE_XET
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.clear_requests_log()  # the server is shared by the session: count only this test's requests
    yield
    assert hub.errors == [], "\n".join(hub.errors)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def tree_bytes(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pack_files() -> dict[str, bytes]:
    """A small regular file, a README with a card, an LFS-by-pattern .safetensors and an LFS-by-size blob."""
    return {
        "config.json": json.dumps({"rank": 8}).encode(),
        "README.md": b"---\ntags:\n- skill\nlicense: mit\n---\n# A pack\n",
        "adapter.safetensors": os.urandom(4096),
        "blobs/big.dat": os.urandom(11 * MB),
    }


def test_create_repo_exist_ok_and_initial_commit(hub: FakeHub) -> None:
    api = HfApi(token=ALICE)
    url = api.create_repo("alice/created", private=False)
    assert url.repo_id == "alice/created" and url == f"{hub.url}/alice/created"
    assert api.create_repo("alice/created", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("alice/created")
    assert conflict.value.response.status_code == 409

    info = api.model_info("alice/created")
    assert len(info.sha) == 40 and info.private is False
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's "initial commit"
    assert api.whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(token=False).create_repo("alice/anonymous")
    assert anonymous.value.response.status_code == 401


def test_upload_then_download_at_branch_tag_and_commit(hub: FakeHub, tmp_path: Path,
                                                       pack_files: dict[str, bytes]) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/pack", exist_ok=True)
    first = api.upload_folder(repo_id="alice/pack", folder_path=make_folder(tmp_path / "v1", pack_files),
                              commit_message="v1")
    assert first.oid == api.model_info("alice/pack").sha

    # The upload modes the server chose: .safetensors by .gitattributes, big.dat by size, the rest inline.
    siblings = {s.rfilename: s for s in api.model_info("alice/pack", files_metadata=True).siblings}
    assert {name for name, s in siblings.items() if s.lfs} == {"adapter.safetensors", "blobs/big.dat"}
    assert siblings["blobs/big.dat"].lfs.sha256 == sha256(pack_files["blobs/big.dat"])
    assert siblings["blobs/big.dat"].size == 11 * MB
    assert api.model_info("alice/pack").card_data["license"] == "mit"
    assert api.model_info("alice/pack").tags == ["skill"]
    assert sum(1 for m, p in hub.requests_log("PUT") if p.startswith("/__lfs__/upload/")) == 2

    api.create_tag("alice/pack", tag="v1", revision=first.oid)

    # Second commit: change config.json, delete the README; parent_commit guards against races.
    second = api.create_commit(
        "alice/pack",
        operations=[CommitOperationAdd("config.json", json.dumps({"rank": 16}).encode()),
                    CommitOperationDelete("README.md")],
        commit_message="v2", parent_commit=first.oid,
    )
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("alice/pack", operations=[CommitOperationAdd("x.txt", b"x")], commit_message="late",
                          parent_commit=first.oid)
    assert stale.value.response.status_code == 412

    expected = {".gitattributes": DEFAULT_GITATTRIBUTES.encode(), **pack_files}
    for revision in ("v1", first.oid):
        folder = snapshot_download("alice/pack", revision=revision, token=ALICE, cache_dir=tmp_path / "cache")
        assert Path(folder).name == first.oid
        assert tree_bytes(folder) == expected
    main = tree_bytes(snapshot_download("alice/pack", revision="main", token=ALICE, cache_dir=tmp_path / "cache"))
    assert json.loads(main["config.json"]) == {"rank": 16} and "README.md" not in main
    assert main["blobs/big.dat"] == pack_files["blobs/big.dat"]

    # hf_hub_download sees the Hub's headers: git sha1 ETag for regular files, sha256 for LFS ones.
    old = hf_hub_download("alice/pack", "config.json", revision="v1", token=ALICE, cache_dir=tmp_path / "c2")
    assert json.loads(Path(old).read_bytes()) == {"rank": 8}
    lfs = get_hf_file_metadata(hf_hub_url("alice/pack", "adapter.safetensors", revision="v1"), token=ALICE)
    assert (lfs.etag, lfs.size, lfs.commit_hash) == (sha256(pack_files["adapter.safetensors"]), 4096, first.oid)
    regular = get_hf_file_metadata(hf_hub_url("alice/pack", "config.json"), token=ALICE)
    content = json.dumps({"rank": 16}).encode()
    assert regular.etag == hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    assert regular.commit_hash == second.oid

    refs = api.list_repo_refs("alice/pack")
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", second.oid)}
    assert {(t.name, t.target_commit) for t in refs.tags} == {("v1", first.oid)}
    with pytest.raises(HfHubHTTPError) as again:
        api.create_tag("alice/pack", tag="v1")
    assert again.value.response.status_code == 409
    api.delete_tag("alice/pack", tag="v1")
    assert api.list_repo_refs("alice/pack").tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/pack", revision="v1")

    # Re-uploading known LFS content: the batch API answers "already there", nothing is PUT again.
    hub.clear_requests_log()
    api.upload_file(path_or_fileobj=pack_files["blobs/big.dat"], path_in_repo="copy.dat", repo_id="alice/pack")
    assert not hub.requests_log("PUT")
    assert api.list_repo_commits("alice/pack")[0].title == "Upload copy.dat with huggingface_hub"


def test_branches_and_encoded_revisions(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/branchy", exist_ok=True)
    main_before = api.model_info("alice/branchy").sha
    for branch in ("dev", "feature/x"):  # "feature/x" travels as feature%2Fx
        api.create_branch("alice/branchy", branch=branch)
        folder = make_folder(tmp_path / branch, {"f.txt": branch.encode()})
        api.upload_folder(repo_id="alice/branchy", folder_path=folder, revision=branch)
        path = hf_hub_download("alice/branchy", "f.txt", revision=branch, token=ALICE, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == branch.encode()
    assert api.model_info("alice/branchy").sha == main_before
    assert api.list_repo_files("alice/branchy") == [".gitattributes"]
    assert api.list_repo_files("alice/branchy", revision="refs/heads/dev") == [".gitattributes", "f.txt"]
    assert {b.name for b in api.list_repo_refs("alice/branchy").branches} == {"main", "dev", "feature/x"}

    api.create_branch("alice/branchy", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch("alice/branchy", branch="dev")
    assert exists.value.response.status_code == 409
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("alice/branchy", operations=[CommitOperationAdd("a", b"a")], commit_message="m",
                          revision="nope")
    api.delete_branch("alice/branchy", branch="feature/x")
    assert {b.name for b in api.list_repo_refs("alice/branchy").branches} == {"main", "dev"}


def test_tree_paths_info_and_commits(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/tree", exist_ok=True)
    files = {"a.json": b"{}", "sub/b.txt": b"b", "sub/deep/c.bin": os.urandom(100)}
    api.upload_folder(repo_id="alice/tree", folder_path=make_folder(tmp_path / "t", files))

    top = {(type(e).__name__, e.path) for e in api.list_repo_tree("alice/tree")}
    assert top == {("RepoFile", ".gitattributes"), ("RepoFile", "a.json"), ("RepoFolder", "sub")}
    everything = {e.path: e for e in api.list_repo_tree("alice/tree", recursive=True)}
    assert set(everything) == {".gitattributes", "a.json", "sub", "sub/b.txt", "sub/deep", "sub/deep/c.bin"}
    assert everything["sub/deep/c.bin"].lfs.sha256 == sha256(files["sub/deep/c.bin"])
    assert everything["sub/b.txt"].size == 1 and everything["sub/b.txt"].lfs is None
    assert {e.path for e in api.list_repo_tree("alice/tree", path_in_repo="sub")} == {"sub/b.txt", "sub/deep"}
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("alice/tree", path_in_repo="missing"))

    info = api.get_paths_info("alice/tree", ["a.json", "sub", "missing.txt"], expand=True)
    assert [(type(e).__name__, e.path) for e in info] == [("RepoFile", "a.json"), ("RepoFolder", "sub")]
    commits = api.list_repo_commits("alice/tree")
    assert info[0].last_commit.oid == commits[0].commit_id
    assert [c.title for c in commits] == ["Upload folder using huggingface_hub", "initial commit"]
    assert api.file_exists("alice/tree", "sub/b.txt") and not api.file_exists("alice/tree", "nope")


def test_private_repo_visible_only_to_its_owner(hub: FakeHub, tmp_path: Path) -> None:
    bob = HfApi(token=BOB)
    bob.create_repo("bob/secret", private=True, exist_ok=True)
    bob.upload_file(path_or_fileobj=b"hidden", path_in_repo="s.txt", repo_id="bob/secret")
    assert bob.model_info("bob/secret").private is True
    for token in (False, ALICE):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info("bob/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("bob/secret", "s.txt", token=token, cache_dir=tmp_path / "c")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("bob/secret", token=token, cache_dir=tmp_path / "c")
    path = hf_hub_download("bob/secret", "s.txt", token=BOB, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"hidden"
    # Writing into someone else's namespace is refused even with a valid token.
    with pytest.raises(HfHubHTTPError) as forbidden:
        HfApi(token=BOB).create_repo("alice/by-bob")
    assert forbidden.value.response.status_code == 403


def test_bad_token_is_a_401_not_a_missing_repo(hub: FakeHub, tmp_path: Path) -> None:
    HfApi(token=ALICE).create_repo("alice/public", exist_ok=True)
    for call in (lambda: HfApi(token="wrong").model_info("alice/public"),
                 lambda: hf_hub_download("alice/public", ".gitattributes", token="wrong", cache_dir=tmp_path),
                 lambda: snapshot_download("alice/public", token="wrong", cache_dir=tmp_path)):
        with pytest.raises(HfHubHTTPError) as error:
            call()
        assert error.value.response.status_code == 401
        assert not isinstance(error.value, RepositoryNotFoundError)


def test_missing_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/exists", exist_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "x", token=ALICE, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nope", token=ALICE, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/exists", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/exists", ".gitattributes", revision="v9", token=ALICE, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("alice/exists", revision="0" * 40, token=ALICE, cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/exists", "missing.json", token=ALICE, cache_dir=tmp_path)


def test_gated_repo(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/gated", exist_ok=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/gated")
    hub.make_gated("alice/gated", granted=["bob"])
    assert api.model_info("alice/gated").gated == "manual"  # metadata stays visible, like on the Hub
    for token in (ALICE, False):
        with pytest.raises(GatedRepoError):
            hf_hub_download("alice/gated", "config.json", token=token, cache_dir=tmp_path / "c")
        with pytest.raises(GatedRepoError):
            snapshot_download("alice/gated", token=token, cache_dir=tmp_path / "c")
    granted = hf_hub_download("alice/gated", "config.json", token=BOB, cache_dir=tmp_path / "c")
    assert Path(granted).read_bytes() == b"{}"


def test_tamper_keeps_size_and_etag_so_only_a_checksum_notices(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/tampered", exist_ok=True)
    weights, config = os.urandom(50_000), b'{"a": 1}'
    api.upload_folder(repo_id="alice/tampered",
                      folder_path=make_folder(tmp_path / "src", {"w.safetensors": weights, "config.json": config}))
    api.create_tag("alice/tampered", tag="good")
    hub.tamper("alice/tampered", "w.safetensors")
    hub.tamper("alice/tampered", "config.json", offsets=[0])

    folder = Path(snapshot_download("alice/tampered", token=ALICE, cache_dir=tmp_path / "c1"))
    bad = (folder / "w.safetensors").read_bytes()
    assert len(bad) == len(weights) and bad != weights
    assert sha256(bad) != sha256(weights)
    recorded = {s.rfilename: s for s in api.model_info("alice/tampered", files_metadata=True).siblings}
    assert recorded["w.safetensors"].lfs.sha256 == sha256(weights)  # what a client-side check compares against
    assert (folder / "config.json").read_bytes() == bytes([config[0] ^ 0xFF]) + config[1:]
    # Copy-on-write: the same commit, reached through the tag, is tampered; the content elsewhere is not.
    api.upload_file(path_or_fileobj=weights, path_in_repo="again.safetensors", repo_id="alice/tampered")
    again = hf_hub_download("alice/tampered", "again.safetensors", token=ALICE, cache_dir=tmp_path / "c2")
    assert Path(again).read_bytes() == weights


def test_allow_patterns_fetch_only_matching_files(hub: FakeHub, tmp_path: Path, pack_files: dict[str, bytes]) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/patterns", exist_ok=True)
    api.upload_folder(repo_id="alice/patterns", folder_path=make_folder(tmp_path / "src", pack_files))
    hub.clear_requests_log()
    folder = snapshot_download("alice/patterns", allow_patterns=["*.json", "*.safetensors"], token=ALICE,
                               cache_dir=tmp_path / "c")
    assert set(tree_bytes(folder)) == {"config.json", "adapter.safetensors"}
    assert sorted(hub.downloaded_files("alice/patterns")) == ["adapter.safetensors", "config.json"]
    assert not any("big.dat" in path for _, path in hub.requests_log())


def test_range_requests(hub: FakeHub) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/ranges", exist_ok=True)
    data = bytes(range(256)) * 40
    api.upload_file(path_or_fileobj=data, path_in_repo="r.bin", repo_id="alice/ranges")
    url = hf_hub_url("alice/ranges", "r.bin")
    auth = {"authorization": f"Bearer {ALICE}"}
    for header, expected in (("bytes=10-19", data[10:20]), ("bytes=10000-", data[10000:]), ("bytes=-5", data[-5:])):
        response = get_session().get(url, headers={**auth, "Range": header})
        assert response.status_code == 206 and response.content == expected
        assert response.headers["Content-Range"].endswith(f"/{len(data)}")
    assert get_session().get(url, headers={**auth, "Range": "bytes=99999-"}).status_code == 416


def test_100mb_upload_and_download_are_fast(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token=ALICE)
    api.create_repo("alice/large", exist_ok=True)
    source = tmp_path / "large.safetensors"
    source.write_bytes(os.urandom(100 * MB))
    start = time.perf_counter()
    api.upload_file(path_or_fileobj=source, path_in_repo="large.safetensors", repo_id="alice/large")
    uploaded = time.perf_counter()
    path = hf_hub_download("alice/large", "large.safetensors", token=ALICE, cache_dir=tmp_path / "c")
    downloaded = time.perf_counter()
    print(f"\n100 MB through FakeHub: upload {uploaded - start:.2f}s, download {downloaded - uploaded:.2f}s")
    with open(path, "rb") as got, open(source, "rb") as want:
        assert hashlib.file_digest(got, "sha256").digest() == hashlib.file_digest(want, "sha256").digest()
    assert downloaded - start < 30  # a few seconds in practice; generous for a loaded 2-core machine


def test_lfs_upload_endpoint_checks_what_it_stores(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    HfApi(token=ALICE).create_repo("alice/lfs", exist_ok=True)
    data = os.urandom(3 * 1024 * 1024 + 17)
    actions, errors, transfer = post_lfs_batch_info(upload_infos=[UploadInfo.from_bytes(data)], token=ALICE,
                                                    repo_type="model", repo_id="alice/lfs", revision="main")
    assert (errors, transfer) == ([], "basic")
    upload = actions[0]["actions"]["upload"]["href"]
    unknown = upload.replace(sha256(data), "0" * 64)
    assert get_session().put(unknown, content=b"x").status_code == 403  # never announced by the batch API
    assert get_session().put(upload, content=os.urandom(len(data))).status_code == 400  # wrong sha256
    # A chunked body (no Content-Length) is streamed to disk as well.
    chunks = (data[i:i + 65536] for i in range(0, len(data), 65536))
    assert get_session().put(upload, content=chunks).status_code == 200
    verify = get_session().post(actions[0]["actions"]["verify"]["href"], json={"oid": sha256(data), "size": len(data)})
    assert verify.status_code == 200
    again, _, _ = post_lfs_batch_info(upload_infos=[UploadInfo.from_bytes(data)], token=ALICE, repo_type="model",
                                      repo_id="alice/lfs")
    assert "actions" not in again[0]  # already stored: nothing to upload

    # State survives a restart on the same root.
    assert FakeHub(hub.storage.root).storage.get_repo("model", "alice/lfs") is not None
