"""Options declared once and shared by the commands that take them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from skillhub.compress.options import CompressionOptions

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
force_option = click.option("--force", is_flag=True,
                            help="Replace the output if it already exists (only ever an output of skillhub).")
base_revision_option = click.option("--revision", "base_revision", help="Hub revision of BASE.")


def base_option(help_text: str = "Base model (needed when the registry holds several).") -> Callable[..., Any]:
    """``--base NAME``: which registered base model a registry command works on."""
    return click.option("--base", help=help_text)


def compression_options(*, calib_samples: int = 128, calib_seqlen: int = 512, ratio: float | None = None,
                        for_add: bool = False, with_recipe: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that say how to compress (recipe, budget, calibration, device, seed), collected
    into one frozen :class:`CompressionOptions` passed to the command as ``compression``.
    ``with_recipe=False`` leaves out --recipe and --seed (``bench compress`` runs every method)."""
    prefix = "With --from: " if for_add else ""
    recipe_options = [
        click.option("--recipe", default="paper", show_default=True, help=f"{prefix}'paper' or a recipe JSON file."),
        click.option("--seed", default=0, show_default=True, help="Seed of randomized SVD."),
    ]
    options = (recipe_options if with_recipe else []) + [
        click.option("--ratio", type=float, default=ratio, show_default=ratio is not None,
                     help=f"{prefix}budget mode: store at most this fraction of the fp16 delta."),
        click.option("--calib", type=click.Path(path_type=Path),
                     help=f"{prefix}calibration text (JSONL with text/prompt, or plain text): GPTQ."),
        click.option("--calib-samples", default=calib_samples, show_default=True, help="Calibration windows."),
        click.option("--calib-seqlen", default=calib_seqlen, show_default=True, help="Tokens per calibration window."),
        click.option("--device", default=None, help="Device for the compression maths: cpu, cuda, cuda:1 ... "
                                                    "(default: $SKILLHUB_DEVICE, else cpu)."),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)  # keeps the click params the decorators below attached
        def collect(*args: Any, ratio: float | None, calib: Path | None, calib_samples: int, calib_seqlen: int,
                    device: str | None, recipe: str = "paper", seed: int = 0, **kwargs: Any) -> Any:
            kwargs["compression"] = CompressionOptions(recipe=recipe, ratio=ratio, calib=calib,
                                                       calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                                                       device=device, seed=seed)
            return command(*args, **kwargs)

        for option in reversed(options):
            collect = option(collect)
        return collect

    return decorate
