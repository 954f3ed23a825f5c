"""Everything that talks to the Hugging Face Hub; the only module importing huggingface_hub.

This is transport only: which requests to send and what their failures mean. What to
publish and how a pulled pack is checked and registered is :mod:`skillhub.sharing`.

Authentication follows Hugging Face conventions: ``HF_TOKEN`` or the cached
``hf auth login`` token, resolved by huggingface_hub itself. skillhub never reads,
prints or stores a token. ``HF_ENDPOINT`` selects another Hub (huggingface_hub reads it
when first imported).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from skillhub import __version__
from skillhub.errors import HubError
from skillhub.io.outputs import describe_os_error
from skillhub.progress import ProgressCallback, no_progress

CHUNK_BYTES = 4 * 1024 * 1024


@contextmanager
def _hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    # The single place where huggingface_hub's exceptions become skillhub errors. Messages
    # never include request headers, so a token cannot leak into them.
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise HubError(f"{at} is gated: accept its terms on the Hub, then set HF_TOKEN") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} not found (or private): check the name, or set HF_TOKEN to a token that can read it"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise HubError(f"revision {revision!r} not found in {repo_id}: use a branch, tag or commit id") from exc
    except hf_errors.LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: first
        raise HubError(f"cannot reach the Hub to fetch {at} and it is not cached: check the network or HF_ENDPOINT") from exc
    except hf_errors.EntryNotFoundError as exc:
        raise HubError(f"{at} has no file {_missing_file(exc)}: check the path in the repo") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            raise HubError(f"the Hub refused the credentials for {at} (HTTP 401): set HF_TOKEN or run `hf auth login`") from exc
        if status == 403 and writing:
            raise HubError(
                f"your Hub token may not write to {repo_id} (HTTP 403): use a token with write access to that "
                "namespace (HF_TOKEN or `hf auth login`)"
            ) from exc
        raise HubError(f"Hub request for {at} failed (HTTP {status or '?'}); try again later") from exc
    except httpx2.TransportError as exc:
        raise HubError(f"cannot reach the Hub at {constants.ENDPOINT} for {at} ({exc}): check the network or HF_ENDPOINT") from exc
    except OSError as exc:  # on this machine: a full disk, a name too long for the file system...
        raise HubError(f"fetching {at}: {describe_os_error(exc, exc.filename or 'a local file')}") from exc


def _missing_file(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    url = str(getattr(response, "url", "") or "")
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "(unknown)"


def _api() -> HfApi:
    return HfApi(library_name="skillhub", library_version=__version__)


def endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT`` when huggingface_hub was imported)."""
    return constants.ENDPOINT.rstrip("/")


# --------------------------------------------------------------------------- reading


def download_snapshot(repo_id: str, *, revision: str | None, patterns: list[str]) -> tuple[Path, str]:
    """Download the files of a model repo that match ``patterns`` (nothing else).

    Args:
        repo_id: ``OWNER/NAME`` of a model repo.
        revision: Branch, tag or commit id; default branch if None.
        patterns: Glob patterns of the files wanted (e.g. weights, config and tokenizer).

    Returns:
        The local snapshot directory and the commit id it holds.

    Raises:
        HubError: The repo or revision cannot be fetched.
    """
    with _hub_errors(repo_id, revision):
        local = Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                library_name="skillhub",
                library_version=__version__,
            )
        )
    # snapshot_download returns .../snapshots/<commit id>.
    return local, local.name


@dataclass(frozen=True)
class Snapshot:
    """A repo at one commit: every later download names the commit, so a branch that moves
    during a pull cannot mix two versions."""

    repo_id: str
    revision: str  # as the user gave it (branch, tag or commit id)
    commit: str
    files: frozenset[str]


def snapshot(repo_id: str, revision: str | None) -> Snapshot:
    """Resolve ``revision`` (default: the default branch) to a commit and list its files.

    Raises:
        HubError: The repo or revision does not exist or cannot be read.
    """
    with _hub_errors(repo_id, revision):
        info = _api().model_info(repo_id, revision=revision)
    return Snapshot(repo_id=repo_id, revision=revision or "main", commit=info.sha,
                    files=frozenset(s.rfilename for s in info.siblings or []))


def download(at: Snapshot, filename: str, destination: Path, *, durable: bool = False, max_bytes: int | None = None,
             progress: ProgressCallback = no_progress) -> tuple[str, int]:
    """Stream one file of a snapshot to ``destination``, hashing it as it arrives.

    The sha256 is computed on a second thread while the next chunk is received, so checking
    a file costs no extra pass over it (huggingface_hub's own download would need one).
    With ``durable``, that thread also flushes what has been written to disk as it goes, so
    the file is on disk when this returns at little more than the cost of receiving it.
    With ``max_bytes``, the download stops as soon as the file proves longer (announced or
    received), so a hostile repo cannot make skillhub fetch more than it expects.

    Returns:
        The file's sha256 (hex) and its size in bytes.

    Raises:
        HubError: The file cannot be fetched, or is longer than ``max_bytes``.
    """
    url = huggingface_hub.hf_hub_url(at.repo_id, filename, revision=at.commit)
    too_long = HubError(f"{at.repo_id}@{at.revision}/{filename} is larger than the {max_bytes:,} bytes expected; "
                        "stopped downloading it") if max_bytes is not None else None
    headers = build_hf_headers(library_name="skillhub", library_version=__version__)
    digest = hashlib.sha256()
    size = 0
    with _hub_errors(at.repo_id, at.revision):
        with http_stream_backoff("GET", url, headers=headers, follow_redirects=True, max_retries=2,
                                 base_wait_time=0.5) as response:
            if response.status_code >= 400:
                response.read()  # the error details are in the body
                hf_raise_for_status(response)
            total = int(response.headers.get("Content-Length") or 0)
            if too_long is not None and total > max_bytes:
                raise too_long
            with open(destination, "wb") as out, ThreadPoolExecutor(max_workers=1) as worker:

                def digest_and_sync(chunk: bytes) -> None:
                    digest.update(chunk)
                    if durable:
                        os.fdatasync(out.fileno())  # the chunk was written before this job was queued

                pending = None
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    if too_long is not None and size + len(chunk) > max_bytes:
                        raise too_long
                    out.write(chunk)
                    out.flush()  # in the kernel before the worker may sync it
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(digest_and_sync, chunk)
                    size += len(chunk)
                    progress(filename, size, total or size)
                if pending is not None:
                    pending.result()
                if durable:
                    os.fsync(out.fileno())
    return digest.hexdigest(), size


def read_bytes(at: Snapshot, filename: str, scratch: Path, *, max_bytes: int) -> bytes:
    """A small file of a snapshot (downloaded to ``scratch``), refused past ``max_bytes``."""
    download(at, filename, scratch, max_bytes=max_bytes)
    return scratch.read_bytes()


def tags(repo_id: str) -> dict[str, str]:
    """The repo's tags and the commits they point to (empty if the repo does not exist)."""
    with _hub_errors(repo_id):
        try:
            refs = _api().list_repo_refs(repo_id)
        except hf_errors.RepositoryNotFoundError:
            return {}
    return {ref.name: ref.target_commit for ref in refs.tags}


# --------------------------------------------------------------------------- writing


def upload(repo_id: str, files: Mapping[str, Path], *, expected_sha256: Mapping[str, str], revision: str | None,
           private: bool, message: str) -> str:
    """Create the repo if needed and commit ``files`` (path in repo -> local file) to ``revision``.

    huggingface_hub hashes every file to upload it; each hash is compared with
    ``expected_sha256`` before anything is sent, so a file damaged on disk is never published.

    Returns:
        The commit id (the branch head if nothing changed).

    Raises:
        HubError: The repo cannot be created or written, or a file does not match its hash.
    """
    api = _api()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    for operation in operations:
        expected = expected_sha256.get(operation.path_in_repo)
        if expected is not None and operation.upload_info.sha256.hex() != expected:
            raise HubError(
                f"{files[operation.path_in_repo]} does not match its sha256 in the manifest: the pack is corrupt "
                "(run `skillhub doctor`); nothing was pushed"
            )
    with _hub_errors(repo_id, revision, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return commit.oid


def tag(repo_id: str, name: str, commit: str, message: str) -> None:
    """Tag ``commit`` as ``name``.

    Raises:
        HubError: The tag cannot be created.
    """
    with _hub_errors(repo_id, name, writing=True):
        _api().create_tag(repo_id, tag=name, revision=commit, tag_message=message)
