"""The pipeline writes the same packs as the skillhub that made tests/data/golden/ (see
tests/data/make_golden_packs.py): the package's reorganisation, and any refactoring after
it, must not change a single stored bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from skillhub import create_pack
from skillhub.io.tensorfile import TensorFile

GOLDEN = Path(__file__).parent / "data" / "golden"
VOLATILE = ("created_at", "skillhub_version", "files")  # when and by which release, and hashes over them
PORTABLE_RECIPE = json.loads((GOLDEN / "portable" / "skillpack.json").read_text())["recipe"]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    # The pack records the directories' names, so they keep the golden ones.
    return shutil.copytree(GOLDEN / "base", tmp_path / "base"), shutil.copytree(GOLDEN / "tuned", tmp_path / "tuned")


def _manifest(pack: Path) -> dict:
    document = json.loads((pack / "skillpack.json").read_text())
    for provenance in document.get("operators", {}).values():
        provenance.pop("distribution_version", None)  # the installed release, like skillhub_version
    return {key: value for key, value in document.items() if key not in VOLATILE}


def _tensors(pack: Path) -> dict[str, torch.Tensor]:
    stored = TensorFile(pack / "skillpack.safetensors")
    return {key: stored.read(key) for key in stored.keys()}


def test_portable_recipe_is_bit_identical(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    made = create_pack(*inputs, tmp_path / "portable", task="golden", recipe=PORTABLE_RECIPE).path
    assert _manifest(made) == _manifest(GOLDEN / "portable")
    golden, new = _tensors(GOLDEN / "portable"), _tensors(made)
    assert list(new) == list(golden)  # same fields, in the same order
    for key, tensor in golden.items():
        assert new[key].dtype == tensor.dtype and torch.equal(new[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_paper_recipe_matches_the_golden_pack(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """The paper recipe's SVD goes through LAPACK, whose last bits may differ between CPUs: the
    layout (ranks, bit widths, fields, bytes) must be identical, the pruned and raw modules bit for
    bit, and the SVD modules' reconstruction errors equal to within float noise."""
    made = create_pack(*inputs, tmp_path / "paper", task="golden").path
    golden_manifest, new_manifest = _manifest(GOLDEN / "paper"), _manifest(made)
    golden_modules, new_modules = golden_manifest.pop("modules"), new_manifest.pop("modules")
    golden_manifest["totals"].pop("relative_error")
    new_manifest["totals"].pop("relative_error")
    assert new_manifest == golden_manifest
    assert list(new_modules) == list(golden_modules)
    golden, new = _tensors(GOLDEN / "paper"), _tensors(made)
    for name, entry in golden_modules.items():
        assert {k: v for k, v in new_modules[name].items() if k != "error"} == \
            {k: v for k, v in entry.items() if k != "error"}, name
        assert new_modules[name]["error"] == pytest.approx(entry["error"], rel=1e-3, abs=1e-6), name
        if entry["operator"] != "svd-mixed":
            for field in entry["fields"]:
                assert torch.equal(new[f"{name}/{field}"].view(torch.uint8), golden[f"{name}/{field}"].view(torch.uint8))
