"""The CUDA paths, where a device is present (``pytest -m gpu``; bench/gpu_check.sh runs them with the
whole-model benchmark). Without one every test here skips: nothing else in the suite needs a GPU.

On the GPU, GPTQ factors with torch's Cholesky and a triangular solve instead of SciPy's in-place
LAPACK, and calibration accumulates X^T X with ``addmm_`` instead of BLAS syrk; the results must
agree with the CPU's up to floating-point order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from skillhub import apply_packs, create_pack
from skillhub.compress.calibrate import capture_statistics, load_for_calibration
from skillhub.compress.windows import build_calibration_set
from skillhub.numerics.gptq import gptq_quantize, output_error, prepare_hessian

from conftest import FineTune

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(cols, cols, generator=generator) * torch.logspace(0, -2, cols)) @ \
        torch.randn(cols, 4 * cols, generator=generator)
    return 2 * inputs @ inputs.T


def test_the_prepared_hessian_on_the_gpu_is_the_cpus() -> None:
    hessian = _hessian(512)
    hessian[9, :] = 0
    hessian[:, 9] = 0
    cpu = prepare_hessian(hessian.clone(), damp=0.01)
    gpu = prepare_hessian(hessian.cuda(), damp=0.01, overwrite=True)
    for start, stop in ((0, 128), (128, 512)):
        expected = cpu.unit_columns(start, stop)
        assert torch.allclose(gpu.unit_columns(start, stop).cpu(), expected, rtol=1e-3, atol=1e-4)
    projection = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    wanted = cpu.quadratic_form(projection)
    assert torch.allclose(gpu.quadratic_form(projection.cuda()).cpu(), wanted, rtol=1e-3,
                          atol=1e-4 * float(wanted.abs().max()))


def test_gptq_on_the_gpu_is_as_accurate_as_on_the_cpu() -> None:
    hessian = _hessian(384, seed=2)
    weight = torch.randn(96, 384, generator=torch.Generator().manual_seed(3))
    errors = []
    for device in ("cpu", "cuda"):
        quantized = gptq_quantize(weight.to(device), hessian.to(device), bits=3, group_size=64)
        errors.append(output_error(weight, quantized.dequantize().cpu(), hessian))
    assert errors[1] == pytest.approx(errors[0], rel=0.02)


def test_calibration_statistics_on_the_gpu_are_the_cpus(finetuned: FineTune) -> None:
    windows = build_calibration_set(finetuned.calib, AutoTokenizer.from_pretrained(finetuned.tuned),
                                    samples=8, seqlen=32)
    layers = {}
    for device in ("cpu", "cuda"):
        _, statistics = next(iter(capture_statistics(load_for_calibration(finetuned.tuned, device=device), windows)))
        layers[device] = statistics
    assert sorted(layers["cpu"]) == sorted(layers["cuda"])
    for name, stats in layers["cpu"].items():
        on_gpu = layers["cuda"][name].hessian.cpu()
        assert torch.allclose(on_gpu, stats.hessian, rtol=1e-3, atol=1e-4 * float(stats.hessian.abs().max())), name


def test_create_on_the_gpu_writes_a_pack_as_good_as_the_cpus(finetuned: FineTune, tmp_path: Path) -> None:
    errors = {}
    for device in ("cpu", "cuda"):
        pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / device, task="gpu", calib=finetuned.calib,
                           calib_samples=8, calib_seqlen=32, device=device)
        manifest = json.loads((pack.path / "skillpack.json").read_text())
        assert manifest["quantizer"]["method"] == "gptq"
        errors[device] = manifest["totals"]["relative_error"]
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=0.02)
    apply_packs(finetuned.base, [tmp_path / "cuda"], tmp_path / "model")  # the GPU's pack applies anywhere
    assert (tmp_path / "model" / "config.json").is_file()
