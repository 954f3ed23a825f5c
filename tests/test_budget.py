"""Budget mode (`create --ratio`): settings chosen per module under a byte budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from skillhub import create_pack
from skillhub.compress.budget import LEVELS, DirectionProfile, allocate
from skillhub.cli import main
from skillhub.pack.format import TENSORS_FILE

from conftest import FineTune


def _module(name: str, sigma: list[float], cost: int = 10) -> DirectionProfile:
    energy = torch.tensor(sigma, dtype=torch.float64) ** 2
    return DirectionProfile(
        name=name,
        drop_error=energy,
        error={bits: energy * 4.0 ** -bits for bits in LEVELS},
        cost={bits: cost * bits for bits in LEVELS},
    )


def test_allocation_spends_within_budget_and_keeps_bits_non_increasing() -> None:
    modules = [_module("a", [5, 4, 3, 2, 1]), _module("b", [1, 0.5, 0.1])]
    spent = allocate(modules, 300)
    assert spent <= 300
    for module in modules:
        counts = module.counts
        assert counts == sorted(counts, reverse=True)  # more directions at 2 bits than at 3, ...
        groups = module.groups()
        assert [bits for _, bits in groups] == sorted((bits for _, bits in groups), reverse=True)
        assert sum(rank for rank, _ in groups) == counts[0]
    # The strong directions of "a" get more bits than the weak ones of "b".
    assert modules[0].groups()[0][1] >= modules[1].groups()[0][1]


def test_budget_pack_fits_its_ratio_and_records_its_choices(finetuned: FineTune, tmp_path: Path) -> None:
    options = {"calib": finetuned.calib, "calib_samples": 32, "calib_seqlen": 64}
    pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / "budget", task="shift", ratio=0.05, **options)
    totals, budget = pack.manifest["totals"], pack.manifest["budget"]
    assert totals["stored_bytes"] <= 0.05 * totals["delta_fp16_bytes"]
    assert budget["ratio"] == 0.05 and budget["weighting"] == "calibration"
    assert budget["target_bytes"] == int(0.05 * totals["delta_fp16_bytes"] * 8) // 8
    recipe = pack.manifest["recipe"]
    assert recipe["name"] == "budget-0.05" and len(recipe["rules"]) == totals["modules"]
    groups = {tuple(map(tuple, m.meta["groups"])) for m in pack.modules.values() if m.operator == "svd-mixed"}
    assert len(groups) > 1  # settings really differ per module

    # The recorded recipe reproduces the pack exactly.
    again = create_pack(finetuned.base, finetuned.tuned, tmp_path / "again", task="shift", recipe=recipe, **options)
    with safe_open(pack.path / TENSORS_FILE, "pt") as a, safe_open(again.path / TENSORS_FILE, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_budget_without_calibration_uses_identity_weighting(finetuned: FineTune, tmp_path: Path) -> None:
    pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / "plain", ratio=0.08)
    assert pack.manifest["budget"]["weighting"] == "identity (no calibration data)"
    assert pack.manifest["quantizer"]["method"] == "rtn"
    assert pack.manifest["totals"]["stored_bytes"] <= 0.08 * pack.manifest["totals"]["delta_fp16_bytes"]


@pytest.mark.parametrize(("ratio", "message"), [
    ("0", "Error: --ratio must be in (0, 1], got 0.0"),
    ("-0.1", "Error: --ratio must be in (0, 1], got -0.1"),
    ("1.01", "Error: --ratio must be in (0, 1], got 1.01"),
    ("0.0001", "Error: a budget of 160 bytes (ratio 0.0001) cannot hold even the norms and biases stored raw"),
])
def test_bad_budgets_exit_1_and_write_nothing(finetuned: FineTune, tmp_path: Path, ratio: str, message: str) -> None:
    result = CliRunner().invoke(main, ["create", str(finetuned.base), str(finetuned.tuned),
                                       "-o", str(tmp_path / "pack"), "--ratio", ratio])
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
