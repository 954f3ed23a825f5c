"""`skillhub bench compress` on a real tiny fine-tune: the paper's storage wins at equal bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillhub.evaluation.benchmark import compare_compression
from skillhub.cli import main

from conftest import FineTune

BASELINES = ("svd-mixed-rtn", "lowrank-fp16", "prune-fp16", "bitdelta")


@pytest.fixture(scope="module")
def report(finetuned: FineTune) -> dict:
    return compare_compression(finetuned.base, finetuned.tuned, ratio=1 / 16, calib=finetuned.calib,
                               calib_samples=64, calib_seqlen=64, eval_file=finetuned.heldout)


def test_svd_mixed_with_gptq_beats_every_baseline_at_equal_bytes(report: dict) -> None:
    rows = {row["method"]: row for row in report["methods"]}
    assert report["error_measure"] == "held-out calibration inputs" and report["quantizer"] == "gptq"
    budget = report["ratio"] * report["delta_fp16_bytes"]
    for method in ("paper", "budget", "svd-mixed-rtn", "lowrank-fp16", "prune-fp16"):
        assert budget * 0.95 <= rows[method]["bytes"] <= budget, method  # equal bytes, within 5%
    assert rows["bitdelta"]["bytes"] >= budget  # one bit per entry plus scales: no smaller than the others
    for baseline in BASELINES:
        assert rows["paper"]["heldout_relative_error"] < rows[baseline]["heldout_relative_error"], baseline


def test_budget_mode_is_no_worse_than_the_paper_recipe(report: dict) -> None:
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["budget"]["heldout_relative_error"] <= rows["paper"]["heldout_relative_error"]
    assert rows["budget"]["bytes"] <= rows["paper"]["bytes"] * 1.01


def test_accuracy_retention_is_reported(report: dict) -> None:
    rows = {row["method"]: row for row in report["methods"]}
    assert report["tuned_accuracy"] >= 0.9
    assert rows["budget"]["retention"] >= 0.95
    for row in rows.values():
        assert row["retention"] == pytest.approx(row["accuracy"] / report["tuned_accuracy"])


def test_cli_json_and_table(finetuned: FineTune) -> None:
    args = ["bench", "compress", str(finetuned.base), str(finetuned.tuned), "--ratio", "0.1"]
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.stdout)
    assert parsed["error_measure"] == "weights (no calibration: H = I)"
    assert [row["method"] for row in parsed["methods"]] == ["paper", "budget", "svd-mixed-rtn", "lowrank-fp16",
                                                            "prune-fp16", "bitdelta"]
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "| method | bytes | ratio | held-out relative output error |" in table.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--ratio", "0"], "Error: --ratio must be in (0, 1], got 0.0"),
    (["--ratio", "1.5"], "Error: --ratio must be in (0, 1], got 1.5"),
])
def test_bad_ratio(finetuned: FineTune, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", "compress", str(finetuned.base), str(finetuned.tuned), *extra])
    assert result.exit_code == 1 and result.stderr.strip() == message


def test_calibration_too_short_for_the_benchmark(finetuned: FineTune, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "compress", str(finetuned.base), str(finetuned.tuned),
                                       "--calib", str(finetuned.calib), "--calib-samples", "4000"])
    assert result.exit_code == 1 and "need" in result.stderr and result.stderr.startswith("Error: calibration file")
