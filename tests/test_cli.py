"""The command line: create / inspect / apply, JSON output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillhub.cli import main
from skillhub.io.outputs import MARKER_FILE
from skillhub.pack.format import MANIFEST_FILE, TENSORS_FILE

from conftest import FineTune, copy_tree, edit_config, edit_tensors


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_create_inspect_apply(finetuned: FineTune, tmp_path: Path) -> None:
    pack = tmp_path / "shift-pack"
    created = run("create", finetuned.base, finetuned.tuned, "-o", pack, "--task", "shift")
    assert created.exit_code == 0, created.output
    assert f"Wrote {pack}:" in created.stdout and "ratio" in created.stdout

    shown = run("inspect", pack)
    assert shown.exit_code == 0
    assert "model.layers.0.mlp.up_proj.weight" in shown.stdout and "svd-mixed" in shown.stdout

    applied = run("apply", finetuned.base, pack, "-o", tmp_path / "model")
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_inspect_json_totals_equal_bytes_on_disk(paper_pack) -> None:
    for args in (("inspect", paper_pack.path, "--json"), ("--json", "inspect", paper_pack.path)):
        result = run(*args)
        assert result.exit_code == 0
        summary = json.loads(result.stdout)
        totals = summary["totals"]
        # Everything but the marker that says skillhub wrote the directory (not part of the pack).
        on_disk = sum(p.stat().st_size for p in paper_pack.path.iterdir() if p.name != MARKER_FILE)
        assert totals["disk_bytes"] == on_disk
        assert totals["stored_bytes"] == sum(m["stored_bytes"] for m in summary["modules"])
        assert totals["stored_bytes"] < (paper_pack.path / TENSORS_FILE).stat().st_size
        assert totals["disk_ratio"] == pytest.approx(on_disk / totals["delta_fp16_bytes"])


def test_create_json_output(finetuned: FineTune, tmp_path: Path) -> None:
    result = run("--json", "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "p", "--task", "shift")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["task"] == "shift" and summary["totals"]["ratio"] < 0.15


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda ft, tmp: ("create", ft.base, tmp / "nope", "-o", tmp / "p"),
         "Error: {tmp}/nope is neither a model directory nor a Hub id (OWNER/NAME)"),
        (lambda ft, tmp: ("create", ft.base, ft.tuned, "-o", tmp / "p", "--recipe", "fancy"),
         "Error: recipe 'fancy' is neither a built-in recipe (paper) nor a file"),
        (lambda ft, tmp: ("inspect", tmp),
         "Error: {tmp} is not a SkillPack: skillpack.json not found"),
        (lambda ft, tmp: ("create", ft.base, ft.tuned, "-o", tmp, "--task", "shift"),
         "Error: {tmp} already exists; choose another path or pass --force to replace it"),
    ],
)
def test_errors_are_one_line_with_exit_1(finetuned: FineTune, tmp_path: Path, make_args, message: str) -> None:
    result = run(*make_args(finetuned, tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [message.format(tmp=tmp_path)]
    assert "Traceback" not in result.output


def test_schema_invalid_manifest_exits_1(paper_pack, tmp_path: Path) -> None:
    broken = copy_tree(paper_pack.path, tmp_path / "broken")
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    del manifest["base"]["fingerprint"]
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = run("inspect", broken)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {broken}/skillpack.json fails the skillpack schema at base:")
    assert "'fingerprint' is a required property" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("create", "only-one-argument").exit_code == 2
    assert run("apply", "base", "-o", tmp_path / "x").exit_code == 2  # no pack given
    assert run("frobnicate").exit_code == 2


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "SKILLHUB_DEBUG": "1"}
    completed = subprocess.run([sys.executable, "-m", "skillhub", "inspect", str(tmp_path)],
                               capture_output=True, text=True, env=env, check=False)
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "PackError" in completed.stderr
    plain = subprocess.run([sys.executable, "-m", "skillhub", "inspect", str(tmp_path)],
                           capture_output=True, text=True, check=False)
    assert plain.returncode == 1
    assert plain.stderr == f"Error: {tmp_path} is not a SkillPack: skillpack.json not found\n"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("skillhub")
    completed = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert completed.stdout.strip().endswith("0.1.0")


def _broken_inputs(finetuned: FineTune, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input of the issue, as (create arguments, expected message fragment)."""
    from test_checkpoint import poison_one_value

    mistral = edit_config(copy_tree(finetuned.tuned, tmp / "mistral"), model_type="mistral",
                          architectures=["MistralForCausalLM"])
    partial = edit_tensors(copy_tree(finetuned.tuned, tmp / "partial"), lambda t: t.pop("model.norm.weight"))
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    truncated = copy_tree(finetuned.tuned, tmp / "truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-64])
    nan = edit_tensors(copy_tree(finetuned.tuned, tmp / "nan"), poison_one_value)
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps({"name": "r", "rules": [{"match": {"role": "mlp"}, "operator": "zstd"}]}))
    empty_calib = tmp / "empty.jsonl"
    empty_calib.write_text("\n")
    fieldless_calib = tmp / "fieldless.jsonl"
    fieldless_calib.write_text('{"question": "2+2"}\n')
    base = str(finetuned.base)
    tuned = str(finetuned.tuned)
    return {
        "architecture": ([base, str(mistral)], "architectures differ"),
        "missing tensor": ([base, str(partial)], "lacks 1 tensor(s) of the base: model.norm.weight"),
        "pickle": ([base, str(pickled)], "holds only pickle weights (pytorch_model.bin)"),
        "truncated": ([base, str(truncated)], "truncated download or copy?"),
        "nan": ([base, str(nan)], "model.layers.2.self_attn.v_proj.weight has 1 NaN/Inf"),
        "unknown operator": ([base, tuned, "--recipe", str(recipe)], "unknown operator 'zstd'"),
        "empty calibration": ([base, tuned, "--calib", str(empty_calib)], "is empty"),
        "calibration without text": ([base, tuned, "--calib", str(fieldless_calib)],
                                     "line 1 has no usable 'text' or 'prompt' field"),
        "calibration too short": ([base, tuned, "--calib", str(finetuned.calib)], "need 65536"),
    }


@pytest.mark.parametrize("case", ["architecture", "missing tensor", "pickle", "truncated", "nan", "unknown operator",
                                  "empty calibration", "calibration without text", "calibration too short"])
def test_bad_inputs_exit_1_with_one_line_and_no_output(finetuned: FineTune, tmp_path: Path, case: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, fragment = _broken_inputs(finetuned, inputs)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("create", *args, "-o", out_dir / "pack")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
    assert list(out_dir.iterdir()) == []  # no pack, no staging directory


def test_verbose_logs_each_stage(paper_pack, finetuned: FineTune, tmp_path: Path) -> None:
    """-v says what each stage did; without it, stderr stays empty."""
    quiet = subprocess.run([sys.executable, "-m", "skillhub", "apply", str(finetuned.base), str(paper_pack.path),
                            "-o", str(tmp_path / "quiet")], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-m", "skillhub", "-v", "create", str(finetuned.base),
                           str(finetuned.tuned), "-o", str(tmp_path / "pack")], capture_output=True, text=True,
                          check=True)
    assert "INFO skillhub.compress.pipeline: compressed" in loud.stderr
    applied = subprocess.run([sys.executable, "-m", "skillhub", "-v", "apply", str(finetuned.base),
                              str(tmp_path / "pack"), "-o", str(tmp_path / "model")], capture_output=True, text=True,
                             check=True)
    assert f"INFO skillhub.activation: wrote {tmp_path / 'model'}" in applied.stderr


def test_an_unexpected_exception_is_one_line_and_its_traceback_needs_verbose() -> None:
    """The group's last resort, exercised by a command that fails the way a bug would."""
    import click

    @click.command("fail-like-a-bug")
    def failing() -> None:
        raise RuntimeError("boom\nsecond line")

    main.add_command(failing)
    try:
        quiet = CliRunner().invoke(main, ["fail-like-a-bug"])
        assert quiet.exit_code == 1
        assert quiet.stderr.splitlines() == [
            "Error: unexpected RuntimeError: boom (a bug in skillhub: rerun with -v for the traceback and report it)"]
        verbose = CliRunner().invoke(main, ["-v", "fail-like-a-bug"])
        assert isinstance(verbose.exception, RuntimeError)  # -v lets the traceback through
    finally:
        main.commands.pop("fail-like-a-bug")
