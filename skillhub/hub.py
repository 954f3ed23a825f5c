"""Everything that talks to the Hugging Face Hub; the only module importing huggingface_hub.

Authentication follows Hugging Face conventions: ``HF_TOKEN`` or the cached
``hf auth login`` token, resolved by huggingface_hub itself. Tokens are never printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hf_errors

from skillhub import __version__
from skillhub.errors import CheckpointError, SkillhubError
from skillhub.models import INDEX_FILE, SIDECAR_FILES


class HubError(SkillhubError):
    """A Hub request failed; the message says what to do about it."""


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    # The single place where huggingface_hub's exceptions become skillhub errors.
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
    except hf_errors.LocalEntryNotFoundError as exc:
        raise HubError(f"cannot reach the Hub to fetch {at} and it is not cached: check the network or HF_ENDPOINT") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        if status == 401:
            raise HubError(f"the Hub refused the credentials for {at} (HTTP 401): set HF_TOKEN or run `hf auth login`") from exc
        raise HubError(f"Hub request for {at} failed (HTTP {status}); try again later") from exc
    except OSError as exc:
        raise HubError(f"network error while fetching {at}: {exc}") from exc


def download_checkpoint(repo_id: str, *, revision: str | None = None) -> tuple[Path, str]:
    """Download a model's safetensors weights, config and tokenizer files (nothing else).

    Args:
        repo_id: ``OWNER/NAME`` of a model repo.
        revision: Branch, tag or commit id; default branch if None.

    Returns:
        The local snapshot directory and the commit id it holds.

    Raises:
        HubError: The repo or revision cannot be fetched.
        CheckpointError: The repo has no safetensors weights.
    """
    patterns = ["*.safetensors", INDEX_FILE, *SIDECAR_FILES]
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
    if not any(local.glob("*.safetensors")):
        raise CheckpointError(
            f"Hub repo {repo_id} has no safetensors weights; skillhub never unpickles *.bin files. "
            "Convert the model to safetensors and push that"
        )
    # snapshot_download returns .../snapshots/<commit id>.
    return local, local.name
