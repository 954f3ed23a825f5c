"""Compression at scale (issue 16): parallel workers give the serial pack byte for byte, and what a
user can get wrong about workers, devices, clusters and calibration sizes is one line, exit 1,
nothing written. (Memory and time at 8B width are measured in bench/bench_scale.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from skillhub import create_pack
from skillhub.cli import main
from skillhub.pack.format import MANIFEST_FILE

from conftest import FineTune


def _pack_bytes(pack_dir: Path) -> dict[str, object]:
    """Every byte of a pack but its creation time (in the manifest, and in the copy of it that the
    tensor file's header carries)."""
    manifest = json.loads((pack_dir / MANIFEST_FILE).read_text())
    manifest.pop("created_at")
    content: dict[str, object] = {"manifest": manifest}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            manifest["files"][name].pop("sha256")  # of a file whose header holds the time: compared below
        data = (pack_dir / name).read_bytes()
        if name.endswith(".safetensors"):
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + size])
            embedded = json.loads(header["__metadata__"]["skillpack"])
            embedded.pop("created_at")
            header["__metadata__"]["skillpack"] = embedded
            content[name] = (header, data[8 + size:])
        elif name != "README.md":  # the model card shows the date too
            content[name] = data
    return content


@pytest.mark.parametrize("calibrated", [False, True])
def test_workers_write_the_serial_pack_byte_for_byte(finetuned: FineTune, tmp_path: Path, calibrated: bool) -> None:
    options = {"calib": finetuned.calib, "calib_samples": 8, "calib_seqlen": 32} if calibrated else {}
    serial = create_pack(finetuned.base, finetuned.tuned, tmp_path / "serial", name="p", task="shift", **options)
    steps: list[tuple[str, int, int]] = []
    parallel = create_pack(finetuned.base, finetuned.tuned, tmp_path / "parallel", name="p", task="shift", workers=2,
                           progress=lambda *step: steps.append(step), **options)
    assert _pack_bytes(serial.path) == _pack_bytes(parallel.path)
    assert serial.manifest["quantizer"]["method"] == ("gptq" if calibrated else "rtn")
    total = len(serial.manifest["modules"]) + len(serial.manifest["unchanged"])
    compress = [(done, of) for stage, done, of in steps if stage == "compress"]
    assert compress == [(done, total) for done in range(1, total + 1)]
    calibrate = [(done, of) for stage, done, of in steps if stage == "calibrate"]
    assert calibrate == ([(layer, 4) for layer in range(1, 5)] if calibrated else [])


def _refused(tmp_path: Path, *args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "pack").exists()  # nothing written, not even a staging directory
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("calib")) == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_zero_workers_are_refused(finetuned: FineTune, tmp_path: Path) -> None:
    line = _refused(tmp_path, "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "pack", "--workers", 0)
    assert line == "Error: --workers must be a whole number >= 1 (1: encode in this process), got 0"


def test_a_device_this_machine_lacks_is_refused(finetuned: FineTune, tmp_path: Path) -> None:
    # "cuda" on a machine without a GPU (CI); one past the last GPU on a machine with some.
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    line = _refused(tmp_path, "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "pack", "--device", device)
    assert line.startswith(f"Error: device '{device}' is not usable here: ")


def test_a_calibration_set_larger_than_memory_is_refused(finetuned: FineTune, tmp_path: Path) -> None:
    line = _refused(tmp_path, "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "pack",
                    "--calib", finetuned.calib, "--calib-samples", 1_000_000, "--calib-seqlen", 100_000)
    assert line.startswith("Error: calibration activations need ")
    assert line.endswith("is available: lower --calib-samples or --calib-seqlen")


def test_ray_address_without_the_ray_executor_is_refused(finetuned: FineTune, tmp_path: Path) -> None:
    line = _refused(tmp_path, "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "pack",
                    "--ray-address", "127.0.0.1:1")
    assert line == "Error: --ray-address needs --executor ray"


def test_the_ray_executor_writes_the_serial_pack_byte_for_byte(finetuned: FineTune, tmp_path: Path) -> None:
    """A Ray instance started for the call (the driver submits two jobs at a time and writes in order)."""
    import ray

    options = {"calib": finetuned.calib, "calib_samples": 8, "calib_seqlen": 32}
    serial = create_pack(finetuned.base, finetuned.tuned, tmp_path / "serial", name="p", task="shift", **options)
    distributed = create_pack(finetuned.base, finetuned.tuned, tmp_path / "ray", name="p", task="shift",
                              executor="ray", workers=2, **options)
    assert _pack_bytes(serial.path) == _pack_bytes(distributed.path)
    assert not ray.is_initialized()  # the instance it started is stopped


def test_an_unreachable_ray_cluster_is_refused_at_once(finetuned: FineTune, tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start = time.perf_counter()
    line = _refused(tmp_path, "create", finetuned.base, finetuned.tuned, "-o", tmp_path / "pack",
                    "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert line.startswith(f"Error: no Ray cluster answers at 127.0.0.1:{port}: ")
    assert time.perf_counter() - start < 30  # Ray alone retries for minutes


def test_dry_run_predicts_the_pack_from_headers_alone(finetuned: FineTune, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """create --dry-run: every module's plan and bytes (exactly what create stores, where the
    operator's bytes do not depend on the data), times and memory; no weight read, nothing written."""
    from skillhub.compress.estimate import estimate_pack
    from skillhub.io.tensorfile import TensorFile

    pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / "pack", task="shift", calib=finetuned.calib,
                       calib_samples=8, calib_seqlen=32)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run read a weight")

    monkeypatch.setattr(TensorFile, "read", no_reading)
    monkeypatch.setattr(TensorFile, "read_rows", no_reading)
    plan = estimate_pack(finetuned.base, finetuned.tuned, calib=finetuned.calib, calib_samples=8, calib_seqlen=32)
    monkeypatch.undo()

    stored = pack.manifest["modules"]
    assert sorted(m["name"] for m in plan["modules"]) == sorted([*stored, *pack.manifest["unchanged"]])
    for module in plan["modules"]:
        if module["name"] not in stored:
            continue
        actual = stored[module["name"]]
        assert module["operator"] == actual["operator"] and module["role"] == actual["role"]
        if module["bytes_exact"]:
            assert module["stored_bytes"] == actual["stored_bytes"], module["name"]
        else:
            assert module["stored_bytes"] >= actual["stored_bytes"], module["name"]
        if actual["operator"] == "svd-mixed":
            assert module["rank_groups"] == actual["meta"]["groups"]
        assert module["seconds"] > 0 and module["peak_bytes"] >= 3 * 4 * module["shape"][0]
    assert plan["quantizer"] == "gptq" and plan["totals"]["calibration_peak_bytes"] > 0
    totals = plan["totals"]
    assert totals["calibration_seconds"] > 0 and totals["seconds"] > totals["calibration_seconds"]
    # The peak counts the process itself (torch and transformers imported: well over 100 MB) and the
    # largest working set on top of it.
    assert totals["peak_bytes"] >= totals["floor_bytes"] + max(m["peak_bytes"] for m in plan["modules"])
    assert totals["floor_bytes"] > 100 * 2**20
    assert any(m["operator"] == "svd-mixed" and m["bytes_exact"] for m in plan["modules"])

    result = CliRunner().invoke(main, ["create", str(finetuned.base), str(finetuned.tuned), "-o", str(tmp_path / "x"),
                                       "--dry-run", "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and not (tmp_path / "x").exists()
    assert json.loads(result.stdout)["totals"]["modules"] == len(plan["modules"])
    text = CliRunner().invoke(main, ["create", str(finetuned.base), str(finetuned.tuned), "-o", str(tmp_path / "x"),
                                     "--dry-run"], catch_exceptions=False)
    assert text.exit_code == 0 and "s of compression on this machine" in text.stdout
    assert not (tmp_path / "x").exists()
