"""``skillhub graft``: distil a source model of any architecture into a SkillPack for the target."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from skillhub.cli.app import main, registry_of
from skillhub.cli.options import (base_option, compression_options, force_option, json_option, merged_policy_option,
                                  prompt_format_options)
from skillhub.cli.output import emit_json, print_scores, progress_bar, wants_json
from skillhub.compress.options import CompressionOptions
from skillhub.scoring.prompts import PromptFormat

if TYPE_CHECKING:
    from skillhub.activation import Merge

_STAGES = ("generate", "score", "sft", "pairs", "dpo", "pack")  # skillhub.graft.STAGES, without importing torch


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help='JSONL of {"prompt"} (with "answer" for --scorer exact).')
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Pack directory to create.")
@click.option("--task", help="Task the pack teaches (default: the pack name).")
@click.option("--source-revision", help="Hub revision of SOURCE.")
@click.option("--target-revision", help="Hub revision of TARGET.")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Where each stage keeps its output, to resume (default: OUTPUT.graft beside the pack).")
@click.option("--samples", default=4, show_default=True, help="Responses the source samples per prompt.")
@click.option("--temperature", default=1.0, show_default=True, help="Sampling temperature (0: greedy, one sample).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling: keep this much probability mass.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Longest response, in source tokens.")
@click.option("--generate-batch", default=16, show_default=True, help="Prompts per generation batch.")
@click.option("--scorer", default="exact", show_default=True,
              help="exact | rule:MODULE:FUNCTION (runs your code) | reward:MODEL | a plugin's NAME[:ARG].")
@click.option("--min-score", type=float, help="Fine-tune only on prompts whose best response scores at least this.")
@click.option("--pairs", type=click.Choice(["paper", "source-vs-target", "none"]), default="paper", show_default=True,
              help="DPO pairs: best vs worst source response, source vs the SFT target's answer, or no DPO.")
@click.option("--dpo-loss", type=click.Choice(["length-normalised", "sigmoid"]), default="length-normalised",
              show_default=True, help="LN-DPO (the paper's for Llama) or DPO.")
@click.option("--beta", type=float, help="DPO beta (default: 10 length-normalised, 0.1 sigmoid).")
@click.option("--preset", type=click.Choice(["auto", "paper", "small"]), default="auto", show_default=True,
              help="Learning rates and epochs: paper (Table 13: SFT 5e-6 x 3 epochs, DPO 8e-7 x 1, for 7-8B targets), "
                   "small (measured on a 135M target: SFT 1e-4 x 3, DPO 5e-6 x 1), auto (small under 1B parameters).")
@click.option("--sft-lr", type=float, help="SFT learning rate (default: the preset's).")
@click.option("--sft-epochs", type=float, help="SFT epochs (default: the preset's).")
@click.option("--sft-steps", type=int, help="SFT optimizer steps (overrides --sft-epochs).")
@click.option("--dpo-lr", type=float, help="DPO learning rate (default: the preset's).")
@click.option("--dpo-epochs", type=float, help="DPO epochs (default: the preset's).")
@click.option("--dpo-steps", type=int, help="DPO optimizer steps (overrides --dpo-epochs).")
@click.option("--batch-size", default=8, show_default=True, help="Examples per device batch (SFT and DPO).")
@click.option("--grad-accum", default=1, show_default=True, help="Batches per optimizer step.")
@click.option("--max-length", default=2048, show_default=True, help="Longest training sequence, in target tokens.")
@compression_options()
@click.option("--keep", is_flag=True, help="Keep the SFT and DPO checkpoints in the work directory.")
@click.option("--stop-after", type=click.Choice(_STAGES), help="Stop once this stage is done (rerun to go on).")
@click.option("--add", "add", is_flag=True, help="Add the pack to the registry as --task (checked first).")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="With --add: the task's eval set.")
@base_option("With --add: the registered base model the target must be.")
@click.option("--new-base", is_flag=True, help="With --add: start a lineage for the target even if other bases exist.")
@merged_policy_option
@prompt_format_options
@force_option
@json_option
@click.pass_context
def graft(ctx: click.Context, source: str, target: str, prompts: Path, output: Path, task: str | None,
          source_revision: str | None, target_revision: str | None, work_dir: Path | None, samples: int,
          temperature: float, top_p: float, max_new_tokens: int, generate_batch: int, scorer: str,
          min_score: float | None, pairs: str, dpo_loss: str, beta: float | None, preset: str, sft_lr: float | None,
          sft_epochs: float | None, sft_steps: int | None, dpo_lr: float | None, dpo_epochs: float | None,
          dpo_steps: int | None, batch_size: int,
          grad_accum: int, max_length: int, compression: CompressionOptions, keep: bool, stop_after: str | None,
          add: bool, eval_file: Path | None, base: str | None, new_base: bool, merge: Merge | None,
          prompt_format: PromptFormat, force: bool, as_json: bool) -> None:
    """Graft what SOURCE does on the prompts into TARGET, as a SkillPack.

    The source (any architecture and tokenizer: only text crosses) samples responses, the
    scorer ranks them, the target is fully fine-tuned on the best (SFT, TRL), then DPO'd on
    preference pairs, and the delta is compressed into the pack. Each stage's output stays in
    the work directory: rerun the same command to resume a killed graft. --seed also seeds
    sampling and training. Needs pip install 'skillhub[graft]'.
    """
    from skillhub.graft import GenerationSettings, TrainingSettings, graft as run_graft

    if (eval_file or base or new_base) and not add:
        raise click.UsageError("--eval, --base and --new-base go with --add")
    as_json = wants_json(ctx, as_json)

    def training(lr: float | None, epochs: float | None, steps: int | None) -> TrainingSettings:
        return TrainingSettings(learning_rate=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                                gradient_accumulation=grad_accum, max_length=max_length)

    with progress_bar(not as_json) as progress:
        result = run_graft(
            source, target, prompts, output, task=task, work_dir=work_dir, source_revision=source_revision,
            target_revision=target_revision, generation=GenerationSettings(
                samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                batch_size=generate_batch),
            scorer=scorer, min_score=min_score, pairs=pairs, dpo_loss=dpo_loss, beta=beta,
            sft=training(sft_lr, sft_epochs, sft_steps), dpo=training(dpo_lr, dpo_epochs, dpo_steps), preset=preset,
            compression=compression, keep=keep, stop_after=stop_after, force=force,
            add_to=registry_of(ctx) if add else None, eval_file=eval_file, base=base, new_base=new_base,
            merge=merge, prompt_format=prompt_format, progress=progress)
    if as_json:
        emit_json(result.to_dict())
        return
    for stage in result.reused:
        click.echo(f"{stage:>8}: reused from {result.work_dir}")
    for stage in result.ran:
        click.echo(f"{stage:>8}: done in {result.seconds[stage]:.1f} s")
    click.echo(f"{result.prompts} prompts, {result.responses} source responses, {result.sft_examples} SFT examples, "
               f"{result.pairs} DPO pairs" + (f" (no DPO: {result.dpo_skipped})" if result.dpo_skipped else ""))
    if result.pack is None:
        click.echo(f"Stopped after {stop_after}; rerun the command to go on from {result.work_dir}")
        return
    manifest = result.pack.manifest
    click.echo(f"Wrote {result.output}: {manifest.stored_bytes:,} bytes (ratio {manifest.ratio:.2%} of the fp16 delta)")
    _print_scores(result)
    for path in result.removed:
        click.echo(f"Removed the intermediate checkpoint {path} (--keep keeps it)")
    if result.added is not None:
        entry = result.added.entry
        click.echo(f"Added pack {entry.id} for task {entry.task} of base {entry.base}")
        if result.added.scores:
            print_scores(list(result.added.scores))


def _print_scores(result) -> None:
    """Held-out and eval-set scores of every model of the graft, and the warning when nothing was learned."""
    scores = result.scores
    if scores is None:
        return
    rows = [("held-out", scores.heldout)] if scores.heldout_prompts else []
    rows += [("eval set", scores.eval)] if any(v is not None for v in scores.eval.values()) else []
    for label, values in rows:
        shown = "  ".join(f"{name.replace('_', ' ')} {value:.2f}" for name, value in values.items() if value is not None)
        count = f" ({scores.heldout_prompts} prompts)" if label == "held-out" else ""
        click.echo(f"{label}{count}: {shown}")
    if result.warning:
        click.echo(f"Warning: {result.warning}", err=True)
