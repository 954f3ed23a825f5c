"""Registry commands: ``init``, ``add``, ``list``, ``show``, ``log``, ``task``, ``activate``,
``remove``, ``doctor``, ``eval`` and ``metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from skillhub.cli.app import main, registry_of
from skillhub.cli.errors import plain
from skillhub.cli.options import (base_option, compression_options, force_option, json_option, merge_options,
                                  merged_policy_option, pack_ids, peft_source_options, prompt_format_options)
from skillhub.cli.output import (emit_json, format_forgetting, print_scores, print_table, progress_bar, wants_json,
                                 warn_if_conflicting)
from skillhub.compress.options import CompressionOptions
from skillhub.errors import SkillhubError
from skillhub.scoring.prompts import PromptFormat

if TYPE_CHECKING:
    from skillhub.activation import Merge
    from skillhub.sharing.peft_import import PeftSource

@main.command()
@click.option("--base", "base_location", metavar="BASE",
              help="Register this base model now (local directory or Hub id), so tasks can be added before any pack.")
@click.option("--revision", help="With a Hub id: branch, tag or commit.")
@click.option("--name", help="Name of the base (default: derived from its id).")
@json_option
@click.pass_context
def init(ctx: click.Context, base_location: str | None, revision: str | None, name: str | None, as_json: bool) -> None:
    """Create (or upgrade) the registry and show where it is; with --base, register a base model."""
    if base_location is None and (revision or name):
        raise click.UsageError("--revision and --name go with --base")
    registry = registry_of(ctx)
    registered = registry.register_base(base_location, revision=revision, name=name) if base_location else None
    if wants_json(ctx, as_json):
        emit_json({"registry": registry.display_url, "store": str(registry.store.root),
                   "base": registered.as_dict() if registered else None})
        return
    click.echo(f"Registry ready at {registry.display_url} (packs in {registry.store.root})")
    if registered is not None:
        state = "registered" if registered.created else "already registered"
        click.echo(plain(f"Base {registered.name} {state}: {registered.location} ({registered.architecture}, "
                         f"{registered.fingerprint[:19]}...)"))


@main.command()
@click.argument("pack", required=False, type=click.Path(path_type=Path))
@click.option("--from", "from_models", nargs=2, metavar="BASE TUNED", help="Create the pack from a fine-tune first.")
@click.option("--task", required=True, help="The task the pack teaches.")
@base_option("Registered base model the pack must belong to.")
@click.option("--new-base", is_flag=True, help="Start a lineage for the pack's base even if other bases exist.")
@click.option("--base-location", help="Where the base weights are, for activation (default: the id in the pack).")
@compression_options(for_add=True)
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Eval set of the task (as `task add`).")
@click.option("--metric", type=click.Choice(["exact_match", "perplexity"]), default="exact_match", show_default=True)
@prompt_format_options
@click.option("--no-eval", is_flag=True, help="Do not score the registered tasks after adding.")
@peft_source_options
@merged_policy_option
@json_option
@click.pass_context
def add(ctx: click.Context, pack: Path | None, from_models: tuple[str, str] | None, task: str, base: str | None,
        new_base: bool, base_location: str | None, compression: CompressionOptions, eval_file: Path | None,
        metric: str, prompt_format: PromptFormat, no_eval: bool, from_peft: PeftSource | None, merge: Merge | None,
        as_json: bool) -> None:
    """Add PACK (or a pack made --from BASE TUNED, or --from-peft ADAPTER) to the registry as task T,
    then score every task."""
    from skillhub.evaluation.forgetting import add_and_score

    if sum(source is not None for source in (pack, from_models, from_peft)) != 1:
        raise click.UsageError("give one of PACK, --from BASE TUNED or --from-peft ADAPTER")
    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        added = add_and_score(registry_of(ctx), pack, from_models=from_models, from_peft=from_peft, task=task, base=base,
                              new_base=new_base, base_location=base_location, compression=compression,
                              eval_file=eval_file, metric=metric, prompt_format=prompt_format,
                              evaluate=not no_eval, merge=merge, progress=progress)
    if as_json:
        emit_json(added)
        return
    entry = added.entry
    click.echo(f"Added pack {entry.id} ({entry.name} {entry.version}) for task {entry.task} of base {entry.base}")
    if added.scores:
        print_scores(added.scores)


@main.command("list")
@base_option("Only this base model's packs.")
@click.option("--all", "include_removed", is_flag=True, help="Include removed packs.")
@json_option
@click.pass_context
def list_packs(ctx: click.Context, base: str | None, include_removed: bool, as_json: bool) -> None:
    """List the packs of the registry, oldest first."""
    packs = registry_of(ctx).list_packs(base=base, include_removed=include_removed)
    if wants_json(ctx, as_json):
        emit_json(packs)
        return
    print_table(["id", "name", "version", "task", "base", "bytes", "ratio", "state"],
                 [[p.id, p.name, p.version, p.task, p.base, f"{p.bytes:,}", f"{p.ratio:.2%}",
                   p.state + (" (purged)" if p.purged else "")] for p in packs])


@main.command()
@click.argument("pack_id")
@json_option
@click.pass_context
def show(ctx: click.Context, pack_id: str, as_json: bool) -> None:
    """Show one pack of the registry."""
    entry = registry_of(ctx).show(pack_id)
    if wants_json(ctx, as_json):
        emit_json(entry)
        return
    for key in ("id", "name", "version", "task", "base", "state", "bytes", "ratio", "parent", "added_at", "path"):
        click.echo(plain(f"{key:>9}: {getattr(entry, key)}"))
    click.echo(f"{'in tasks':>9}: {', '.join(entry.in_tasks) or '-'}")


@main.command()
@base_option("Only this base model's lineage.")
@json_option
@click.pass_context
def log(ctx: click.Context, base: str | None, as_json: bool) -> None:
    """The lineage: every add, remove and task-set change, oldest first."""
    events = registry_of(ctx).log(base=base)
    if wants_json(ctx, as_json):
        emit_json(events)
        return
    for e in events:
        what = " ".join(f"{k}={v}" for k, v in e.detail.items())
        click.echo(plain(f"{e.id:>5} {e.at[:19]} {e.base} {e.kind:<14} {e.pack or '-':<12} {e.task or '-'} {what} "
                         f"({e.actor})"))


@main.group()
def task() -> None:
    """Tasks and their activation sets."""


@task.command("list")
@base_option()
@json_option
@click.pass_context
def task_list(ctx: click.Context, base: str | None, as_json: bool) -> None:
    """Every task with the packs of its activation set."""
    tasks = registry_of(ctx).tasks(base=base)
    if wants_json(ctx, as_json):
        emit_json(tasks)
        return
    print_table(["task", "activation set", "chosen", "prompt format"],
                 [[t.name, ", ".join(t.packs) or "(base only)", "explicit" if t.explicit else "default",
                   t.prompt_format.describe()] for t in tasks])


@task.command("add")
@click.argument("name")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="JSONL eval set: {prompt, answer} for exact_match, {text} for perplexity.")
@click.option("--lm-eval", "lm_eval_task", metavar="TASK",
              help="Or: an lm-evaluation-harness task (or group), scored on the model in process.")
@click.option("--lm-eval-include", type=click.Path(path_type=Path), metavar="DIR",
              help="With --lm-eval: a folder of your own lm-eval task YAML files.")
@click.option("--limit", type=int, help="With --lm-eval: score at most this many examples per task.")
@click.option("--metric", help="exact_match (default) or perplexity for --eval; an lm-eval metric for --lm-eval "
                               "(default: the task's first).")
@prompt_format_options
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded).")
@click.option("--no-eval", is_flag=True, help="Do not score the base model on the task now.")
@json_option
@click.pass_context
def task_add(ctx: click.Context, name: str, eval_file: Path | None, lm_eval_task: str | None,
             lm_eval_include: Path | None, limit: int | None, metric: str | None, prompt_format: PromptFormat,
             base: str | None, base_path: str | None, no_eval: bool, as_json: bool) -> None:
    """Give task NAME an eval set (a file, or an lm-eval task), scored now on the base model and at
    every later addition."""
    from skillhub.evaluation.forgetting import declare_task
    from skillhub.scoring.harness import HarnessTask

    if (eval_file is None) == (lm_eval_task is None):
        raise click.UsageError("give --eval FILE or --lm-eval TASK")
    if lm_eval_task is None and (lm_eval_include or limit):
        raise click.UsageError("--lm-eval-include and --limit go with --lm-eval")
    if eval_file is not None and metric not in (None, "exact_match", "perplexity"):
        raise click.UsageError(f"--metric for an eval file is exact_match or perplexity, not {metric!r}")
    harness = None if lm_eval_task is None else HarnessTask(
        lm_eval_task, include=str(lm_eval_include) if lm_eval_include else None, limit=limit, metric=metric)
    result = declare_task(registry_of(ctx), name, eval_file, metric=None if harness else metric, lm_eval=harness,
                          base=base, base_location=base_path, prompt_format=prompt_format, evaluate=not no_eval)
    if wants_json(ctx, as_json):
        emit_json(result)
        return
    task = result.task
    digest = f", sha256 {task.sha256[:12]}" if task.sha256 else ""
    shown = PromptFormat.from_json(task.prompt_format).describe()
    click.echo(plain(f"Task {name}: eval set {task.eval} ({task.metric}{digest}, prompt format {shown})"))
    for record in result.scores:
        click.echo(f"  base model: {record['metric']} {record['score']:.4f}")


@task.command("set")
@click.argument("name")
@click.option("--packs", required=True, help="Comma-separated pack ids (empty: the base alone).")
@base_option()
@json_option
@click.pass_context
def task_set(ctx: click.Context, name: str, packs: str, base: str | None, as_json: bool) -> None:
    """Make the activation set of task NAME exactly --packs."""
    ids = pack_ids(packs)
    result = registry_of(ctx).set_task(name, ids, base=base)
    if wants_json(ctx, as_json):
        emit_json(result)
    else:
        click.echo(f"Task {name}: {', '.join(result.packs) or '(base only)'}")


@main.command()
@click.option("--task", "task_name", help="Activate this task's set S_t.")
@click.option("--packs", help="Or: comma-separated pack ids.")
@base_option("Registered base model (needed when the registry holds several).")
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@merge_options
@force_option
@json_option
@click.pass_context
def activate(ctx: click.Context, task_name: str | None, packs: str | None, base: str | None, base_path: str | None,
             output: Path, merge: Merge | None, force: bool, as_json: bool) -> None:
    """Write theta_base + sum (or --merge) of the activation set as a Hugging Face checkpoint (Eq. 10)."""
    if (task_name is None) == (packs is None):
        raise click.UsageError("give exactly one of --task or --packs")
    ids = pack_ids(packs) if packs is not None else None
    as_json = wants_json(ctx, as_json)
    registry = registry_of(ctx)
    if merge is None:
        warn_if_conflicting(registry.activation_set(task=task_name, packs=ids, base=base)[1])
    with progress_bar(not as_json) as progress:
        written = registry.activate(output, task=task_name, packs=ids, base=base, base_location=base_path,
                                    force=force, merge=merge, progress=progress)
    if as_json:
        emit_json({"output": str(written)})
    else:
        click.echo(f"Wrote {written}; load it with AutoModelForCausalLM.from_pretrained")


@main.command()
@click.argument("pack_id")
@click.option("--purge", is_flag=True, help="Also delete the pack's files from the store.")
@json_option
@click.pass_context
def remove(ctx: click.Context, pack_id: str, purge: bool, as_json: bool) -> None:
    """Unlearn a pack: remove it from the lineage and from every activation set."""
    entry = registry_of(ctx).remove(pack_id, purge=purge)
    if wants_json(ctx, as_json):
        emit_json(entry)
    else:
        click.echo(f"Removed pack {entry.id} ({entry.name} {entry.version})" + (", files purged" if purge else ""))


@main.command()
@click.option("--repair", is_flag=True, help="Delete unreferenced stored packs and interrupted writes.")
@json_option
@click.pass_context
def doctor(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Verify every stored pack against the registry database."""
    report = registry_of(ctx).doctor(repair=repair)
    if wants_json(ctx, as_json):
        emit_json(report)
    else:
        click.echo(f"{report.checked} pack(s) checked: " + ("consistent" if report.consistent else "INCONSISTENT"))
        for problem in report.problems:
            click.echo(f"  problem: pack {problem['pack']}: {problem['problem']}")
        for orphan in report.orphans:
            click.echo(f"  leftover: stored pack {orphan[:12]} is not referenced (doctor --repair deletes it)")
        for leftover in report.leftovers:
            click.echo(f"  leftover: interrupted write {leftover} (doctor --repair deletes it)")
        for done in report.repaired:
            click.echo(f"  repaired: {done}")
        for left in report.kept:
            click.echo(f"  kept: {left}")
    if not report.consistent:
        ctx.exit(1)


@main.command("eval")
@click.option("--task", "task_name", help="Only this task (default: every task with an eval set).")
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@merged_policy_option
@json_option
@click.pass_context
def eval_command(ctx: click.Context, task_name: str | None, base: str | None, base_path: str | None,
                 merge: Merge | None, as_json: bool) -> None:
    """Score tasks now under their own set, all packs summed, routed, merged, and the base; record the scores."""
    from skillhub.evaluation.forgetting import evaluate_tasks

    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        records = evaluate_tasks(registry_of(ctx), base=base, task=task_name, base_location=base_path,
                                 merge=merge, progress=progress)
    if as_json:
        emit_json(records)
    elif records:
        print_scores(records)
    else:
        click.echo("No task has an eval set yet: `skillhub task add T --eval FILE`")


@main.command()
@base_option()
@click.option("--plot", type=click.Path(path_type=Path), help="Also write heatmaps of R to this PNG (matplotlib).")
@json_option
@click.pass_context
def metrics(ctx: click.Context, base: str | None, plot: Path | None, as_json: bool) -> None:
    """The accuracy matrix R per policy (R_kj: task j's score after learning task k), with ACC, BWT,
    FWT and average forgetting."""
    from skillhub.evaluation.forgetting import accuracy_matrices, plot_matrices

    if plot is not None and not plot.parent.is_dir():
        raise SkillhubError(f"cannot write the plot to {plot}: directory {plot.parent} does not exist")
    result = accuracy_matrices(registry_of(ctx), base=base)
    if plot is not None:
        plot_matrices(result, str(plot))
    if wants_json(ctx, as_json):
        emit_json(result)
        return
    click.echo(format_forgetting(result))
    if plot is not None:
        click.echo(f"\nPlot written to {plot}")
