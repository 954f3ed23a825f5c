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


def pack_ids(text: str) -> list[str]:
    """The ids of a comma-separated ``--packs`` value (empty: none)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def merged_policy_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--merged-policy M``: which merge of all packs is scored as a policy of its own (``none``: none),
    passed to the command as ``merge``."""

    @functools.wraps(command)
    def collect(*args: Any, merged_policy: str, **kwargs: Any) -> Any:
        from skillhub.activation import Merge

        kwargs["merge"] = None if merged_policy == "none" else Merge(merged_policy)
        return command(*args, **kwargs)

    return click.option("--merged-policy", default="ties", show_default=True,
                        help="Merge of all packs scored as a policy: task-arithmetic, ties, dare-linear, dare-ties, "
                             "or none.")(collect)


def prompt_format_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--format chat|plain`` and ``--system TEXT``: how prompts are rendered, passed to the command as
    ``prompt_format`` (a :class:`~skillhub.scoring.prompts.PromptFormat`; both unset: the tokenizer's
    default, its chat template when it has one)."""

    @functools.wraps(command)
    def collect(*args: Any, format_kind: str | None, system: str | None, **kwargs: Any) -> Any:
        from skillhub.errors import SkillhubError
        from skillhub.scoring.prompts import PromptFormat

        try:
            kwargs["prompt_format"] = PromptFormat(format_kind, system)
        except SkillhubError as exc:
            raise click.UsageError(str(exc)) from exc
        return command(*args, **kwargs)

    with_system = click.option("--system", help="A system turn before each prompt (chat format only).")(collect)
    return click.option("--format", "format_kind", type=click.Choice(["chat", "plain"]),
                        help="How prompts are rendered: the chat template's user turn, or <bos> + prompt "
                             "(default: chat when the tokenizer has a template).")(with_system)


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
        click.option("--workers", default=1, show_default=True, type=int,
                     help="Modules encoded at once, each in its own process (the pack's bytes do not change)."),
        click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
                     help="Where workers run: this machine, or a Ray cluster (pip install 'skillhub[ray]')."),
        click.option("--ray-address", help="Ray cluster to join with --executor ray (default: $RAY_ADDRESS, "
                                           "else a Ray started for this command)."),
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
                    device: str | None, recipe: str = "paper", seed: int = 0, workers: int = 1,
                    executor: str = "local", ray_address: str | None = None, **kwargs: Any) -> Any:
            kwargs["compression"] = CompressionOptions(recipe=recipe, ratio=ratio, calib=calib,
                                                       calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                                                       device=device, seed=seed, workers=workers, executor=executor,
                                                       ray_address=ray_address)
            return command(*args, **kwargs)

        for option in reversed(options):
            collect = option(collect)
        return collect

    return decorate


def merge_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--merge, --weights, --density, --lambda (and --merge-seed), collected into one
    :class:`skillhub.activation.Merge` passed as ``merge`` (None for the plain sum)."""
    options = [
        click.option("--merge", "merge_method", default="sum", show_default=True,
                     help="How several packs combine: sum, task-arithmetic, ties, dare-linear or dare-ties."),
        click.option("--weights", help="Comma-separated weight per pack, in order (default: 1 each)."),
        click.option("--density", type=float, help="ties/dare: fraction of each delta kept, in (0, 1] (default 0.5)."),
        click.option("--lambda", "scale", type=float, help="Factor on the merged delta, in (0, 10] (default 1.0)."),
        click.option("--merge-seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop."),
    ]

    @functools.wraps(command)
    def collect(*args: Any, merge_method: str, weights: str | None, density: float | None, scale: float | None,
                merge_seed: int, **kwargs: Any) -> Any:
        from skillhub.activation import Merge
        from skillhub.errors import SkillhubError

        parsed = None
        if weights is not None:
            try:
                parsed = tuple(float(w) for w in weights.split(","))
            except ValueError as exc:
                raise SkillhubError(f"--weights must be comma-separated numbers, not {weights!r}") from exc
        given = {k: v for k, v in (("density", density), ("scale", scale)) if v is not None}
        merge = Merge(merge_method, weights=parsed, seed=merge_seed, **given)
        kwargs["merge"] = None if merge.is_plain_sum else merge
        return command(*args, **kwargs)

    for option in reversed(options):
        collect = option(collect)
    return collect


def peft_source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--from-peft ADAPTER, --adapter-revision, --ignore-base-name and --compress, collected into one
    :class:`skillhub.sharing.peft_import.PeftSource` passed as ``from_peft`` (None without --from-peft)."""
    options = [
        click.option("--from-peft", "adapter", metavar="ADAPTER",
                     help="Make the pack from a PEFT LoRA adapter (directory or Hub id), exactly by default."),
        click.option("--adapter-revision", help="With a Hub id for --from-peft: branch, tag or commit."),
        click.option("--ignore-base-name", is_flag=True,
                     help="Accept a base whose name differs from the adapter's base_model_name_or_path."),
        click.option("--compress", is_flag=True,
                     help="With --from-peft: compress the adapter's delta with the recipe options instead."),
    ]

    @functools.wraps(command)
    def collect(*args: Any, adapter: str | None, adapter_revision: str | None, ignore_base_name: bool,
                compress: bool, **kwargs: Any) -> Any:
        from skillhub.sharing.peft_import import PeftSource

        if adapter is None and (adapter_revision or ignore_base_name or compress):
            raise click.UsageError("--adapter-revision, --ignore-base-name and --compress go with --from-peft")
        compression = kwargs.get("compression")  # collected by compression_options, applied above this
        if adapter is not None and not compress and compression is not None and (
                compression.ratio is not None or compression.calib is not None or compression.recipe != "paper"):
            raise click.UsageError("--recipe, --ratio and --calib compress an adapter: add --compress "
                                   "(without it, --from-peft keeps the adapter's factors exactly)")
        kwargs["from_peft"] = None if adapter is None else PeftSource(adapter, adapter_revision, ignore_base_name, compress)
        return command(*args, **kwargs)

    for option in reversed(options):
        collect = option(collect)
    return collect
