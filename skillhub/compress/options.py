"""How to compress, as one frozen value: what ``create``, ``add --from`` and ``bench compress``
share (in the way mergekit's MergeOptions gathers its options)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CompressionOptions:
    """Recipe, byte budget, calibration and where the maths runs.

    Attributes:
        recipe: ``"paper"`` or a recipe JSON file.
        ratio: Budget mode: store at most this fraction of the fp16 delta (None: the recipe decides).
        calib: Calibration text for GPTQ (None: round-to-nearest).
        calib_samples: Calibration windows.
        calib_seqlen: Tokens per window.
        device: ``cpu``, ``cuda``... (None: ``$SKILLHUB_DEVICE``, else cpu).
        seed: Seed of randomized operators.
        workers: Modules encoded at once, each in its own process.
        executor: ``"local"`` or ``"ray"``.
        ray_address: Ray cluster for ``executor="ray"`` (None: ``$RAY_ADDRESS``, else a local one).
    """

    recipe: str | os.PathLike[str] | dict[str, Any] = "paper"
    ratio: float | None = None
    calib: str | os.PathLike[str] | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    device: str | None = None
    seed: int = 0
    workers: int = 1
    executor: str = "local"
    ray_address: str | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`skillhub.compress.create_pack` (which resolves a None device)."""
        return asdict(self)
