"""skillhub-dare: the conformance suite, plus what DARE promises (unbiased, seeded, its byte count)."""

from __future__ import annotations

import math

import pytest
import torch

from skillhub.operators import EncodeContext, resolve_params
from skillhub.testing import conformance_checks, relative_error, sample_delta
from skillhub_dare import DareOperator

OPERATOR = DareOperator()


def encode(delta: torch.Tensor, given: dict, *, name: str = "layers.0.mlp.up_proj.weight", seed: int = 0):
    params = resolve_params(OPERATOR, given, where="test")
    encoded = OPERATOR.encode(delta, params, EncodeContext(name=name, role="mlp", seed=seed))
    decoded = OPERATOR.decode(encoded.tensors, encoded.meta, params, tuple(delta.shape), version=OPERATOR.version)
    return encoded, decoded


@pytest.mark.parametrize("check", conformance_checks(OPERATOR, shapes=[(64, 96), (96, 40), (6, 10, 4), (300,)]), ids=str)
def test_conformance(check) -> None:
    check()


@pytest.mark.parametrize("drop", [0.5, 0.9])
def test_drops_about_the_asked_fraction_and_rescales_survivors(drop: float) -> None:
    delta = sample_delta((200, 300))
    encoded, decoded = encode(delta, {"drop": drop, "dtype": "float32"})
    kept = decoded != 0
    assert abs(1 - kept.float().mean().item() - drop) < 0.01
    assert torch.allclose(decoded[kept], delta[kept] / (1 - drop))
    assert encoded.meta["kept"] == int(kept.sum())


def test_is_unbiased_over_seeds() -> None:
    delta = sample_delta((40, 50))
    mean = sum(encode(delta, {"drop": 0.5, "dtype": "float32"}, seed=s)[1] for s in range(400)) / 400
    # One draw is off by ~100%; the mean of 400 by ~100% / sqrt(400) = 5%.
    assert relative_error(delta, mean) < 0.08
    assert relative_error(delta, encode(delta, {"drop": 0.5, "dtype": "float32"})[1]) > 0.8


def test_mask_depends_on_seed_and_parameter_name() -> None:
    delta = sample_delta((32, 32))
    first = encode(delta, {"drop": 0.5})[0].tensors["mask"]
    assert torch.equal(first, encode(delta, {"drop": 0.5})[0].tensors["mask"])
    assert not torch.equal(first, encode(delta, {"drop": 0.5}, seed=1)[0].tensors["mask"])
    assert not torch.equal(first, encode(delta, {"drop": 0.5}, name="layers.1.mlp.up_proj.weight")[0].tensors["mask"])


def test_drop_zero_keeps_everything_exactly() -> None:
    delta = sample_delta((30, 20))
    _, decoded = encode(delta, {"drop": 0.0, "dtype": "float32"})
    assert torch.equal(decoded, delta)


def test_stores_a_bitmask_plus_the_kept_values() -> None:
    delta = sample_delta((101, 37))
    encoded, _ = encode(delta, {"drop": 0.9})
    assert encoded.tensors["mask"].dtype == torch.uint8
    assert encoded.tensors["mask"].numel() == math.ceil(delta.numel() / 8)
    assert encoded.tensors["values"].dtype == torch.float16
    assert encoded.tensors["values"].numel() == encoded.meta["kept"]
