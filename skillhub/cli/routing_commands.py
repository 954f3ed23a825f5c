"""Routing commands: ``route train | eval | show | examples``, ``generate`` and ``interference``."""

from __future__ import annotations

from pathlib import Path

import click

from skillhub.cli.app import main, registry_of
from skillhub.cli.errors import plain
from skillhub.cli.options import base_option, json_option, pack_ids, prompt_format_options
from skillhub.cli.output import emit_json, print_table, progress_bar, wants_json
from skillhub.scoring.prompts import PromptFormat


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@main.group()
def route() -> None:
    """The router that picks packs per prompt (paper Eq. 9, App. B.3)."""


@route.command("train")
@click.option("--labels", default="task", show_default=True,
              help="task: each example's task; loss: the class whose packs give its answer the lowest NLL.")
@click.option("--layer", type=int, help="Base model layer the features come from (default: half its depth).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Below this probability for its best class, a prompt stays on the base model.")
@prompt_format_options
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@json_option
@click.pass_context
def route_train(ctx: click.Context, labels: str, layer: int | None, threshold: float, prompt_format: PromptFormat,
                base: str | None, base_path: str | None, as_json: bool) -> None:
    """Train the base's router on its routing examples and store it in the registry. Its prompt format
    (--format, --system) renders every prompt it routes and the answers of routed generation."""
    from skillhub.routing.training import train_router

    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        trained = train_router(registry_of(ctx), base=base, labels=labels, layer=layer, threshold=threshold,
                               base_location=base_path, prompt_format=prompt_format, progress=progress)
    spec, _ = trained.router.to_stored()
    if as_json:
        emit_json({"step": trained.step, **spec, "warnings": list(trained.warnings)})
        return
    for warning in trained.warnings:
        click.echo(plain(f"Warning: {warning}"), err=True)
    info = spec["info"]
    click.echo(plain(f"Trained router (step {trained.step}): {len(spec['classes'])} classes "
                     f"({', '.join(c['name'] for c in spec['classes'])}), layer {spec['layer']}, labels {labels}, "
                     f"{info['examples']['train']} examples; accuracy train {_percent(info['accuracy']['train'])}, "
                     f"held-out {_percent(info['accuracy']['heldout'])}"))


@route.command("eval")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(path_type=Path),
              help='JSONL of {"prompt", "answer", "task"} (repeatable; default: held-out eval-set examples).')
@click.option("--allow-stale", is_flag=True, help="Evaluate a stale router among the classes it knows.")
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@json_option
@click.pass_context
def route_eval(ctx: click.Context, eval_files: tuple[Path, ...], allow_stale: bool, base: str | None,
               base_path: str | None, as_json: bool) -> None:
    """Routing accuracy, routed score vs own-set score vs base, confusion matrix; the training-free
    spectral router beside it."""
    from skillhub.routing.evaluation import evaluate_router

    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        report = evaluate_router(registry_of(ctx), base=base, eval_files=list(eval_files), base_location=base_path,
                                 allow_stale=allow_stale, progress=progress)
    if as_json:
        emit_json(report)
        return
    print_table(["task", "examples", "routing acc.", "routed", "own set", "base", "spectral acc.", "spectral routed"],
                [[t.task, str(t.examples), _percent(t.accuracy), _percent(t.routed), _percent(t.own_set),
                  _percent(t.base), _percent(t.spectral_accuracy), _percent(t.spectral_routed)] for t in report.tasks])
    click.echo(f"Routing accuracy {report.accuracy:.4f} (trained router), {report.spectral_accuracy:.4f} (spectral)")
    print_table(["true \\ routed", *report.classes],
                [[name, *(str(n) for n in row)] for name, row in zip(report.classes, report.confusion)],
                title="Confusion matrix (trained router)")


@route.command("show")
@base_option()
@json_option
@click.pass_context
def route_show(ctx: click.Context, base: str | None, as_json: bool) -> None:
    """The base's router: classes, packs, features, training, and whether it is stale."""
    from skillhub.routing.training import router_report

    spec = router_report(registry_of(ctx), base=base)
    if wants_json(ctx, as_json):
        emit_json(spec)
        return
    print_table(["class", "packs", "state"],
                [[c["name"], ", ".join(c["packs"]) or "(base only)",
                  "active" if c["usable"] else "dropped (pack removed)"] for c in spec["classes"]])
    info, stale = spec["info"], spec["stale"]
    click.echo(plain(f"layer {spec['layer']}, labels {spec['labels']}, threshold {spec['threshold']}, trained "
                     f"{info.get('trained_at', '?')} on {info['examples']['train']} examples (held-out accuracy "
                     f"{_percent(info['accuracy']['heldout'])})"))
    if any(stale.values()):
        parts = [f"{k}: {', '.join(v)}" for k, v in stale.items() if v]
        click.echo(plain(f"stale ({'; '.join(parts)}): retrain with `skillhub route train`"))


@route.command("examples")
@click.argument("task")
@click.argument("file", type=click.Path(path_type=Path))
@base_option()
@json_option
@click.pass_context
def route_examples(ctx: click.Context, task: str, file: Path, base: str | None, as_json: bool) -> None:
    """Give TASK (or @base: prompts no pack should take) a JSONL file of routing examples
    ({"prompt"}, with "answer" for --labels loss)."""
    result = registry_of(ctx).add_routing_examples(task, file, base=base)
    if wants_json(ctx, as_json):
        emit_json(result)
    else:
        click.echo(plain(f"Routing examples of {task}: {result.path}"))


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--task", "task_name", help="Use this task's activation set for every prompt.")
@click.option("--packs", help="Or: comma-separated pack ids.")
@click.option("--route", "routed", is_flag=True, help="Or: let the router pick per prompt.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--allow-stale", is_flag=True, help="Route with a stale router among the classes it knows.")
@prompt_format_options
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@json_option
@click.pass_context
def generate(ctx: click.Context, prompts: tuple[str, ...], task_name: str | None, packs: str | None, routed: bool,
             max_new_tokens: int, allow_stale: bool, prompt_format: PromptFormat, base: str | None,
             base_path: str | None, as_json: bool) -> None:
    """Answer PROMPTs greedily with the packs of a task, given packs, or the router's choice, each until
    the end of its turn. Prompts are rendered in the task's format with --task, the router's with
    --route, else the base's default (its chat template when it has one), unless --format says."""
    from skillhub.routing.generate import Generator

    if sum([task_name is not None, packs is not None, routed]) != 1:
        raise click.UsageError("give exactly one of --task, --packs or --route")
    if packs is not None and not pack_ids(packs):
        from skillhub.errors import SkillhubError

        raise SkillhubError("--packs names no pack: give pack ids (see `skillhub list`), or --task T")
    as_json = wants_json(ctx, as_json)
    chosen_format = None if prompt_format == PromptFormat() else prompt_format
    with Generator(registry_of(ctx), base=base, base_location=base_path, max_new_tokens=max_new_tokens,
                   allow_stale=allow_stale, prompt_format=chosen_format) as generator, progress_bar(not as_json) as progress:
        answers = generator.generate(list(prompts), task=task_name, packs=pack_ids(packs) if packs else None,
                                     route=routed, progress=progress)
    if as_json:
        emit_json(answers)
        return
    for answer in answers:
        how = f"task {answer.task}" if answer.task else "base model"
        if answer.probability is not None:
            how += f", p={answer.probability:.2f}" + (" (abstained)" if answer.abstained else "")
        click.echo(plain(f"{answer.prompt} -> {answer.output}    [{how}; packs {', '.join(answer.packs) or '-'}]"))


@main.command()
@click.argument("packs", nargs=-1, required=True)
@click.option("--rank", type=int, default=8, show_default=True, help="k: size of the input subspaces compared.")
@base_option()
@json_option
@click.pass_context
def interference(ctx: click.Context, packs: tuple[str, ...], rank: int, base: str | None, as_json: bool) -> None:
    """How PACKS (registry ids or pack directories, at least two) would interfere if combined."""
    from skillhub.errors import SkillhubError
    from skillhub.scoring.interference import interference as measure
    from skillhub.pack.format import load_pack

    if len(packs) < 2:
        raise SkillhubError("interference needs at least two packs")
    if not 1 <= rank <= 256:
        raise SkillhubError(f"--rank must be in 1..256, not {rank}")
    opened, labels = [], []
    registry = None
    for pack in packs:
        if Path(pack).is_dir():
            opened.append(load_pack(pack))
            labels.append(opened[-1].name)
        else:
            registry = registry or registry_of(ctx)
            opened.append(registry.activation_set(packs=[pack], base=base)[1][0])
            labels.append(registry.activation_ids(packs=[pack], base=base)[0])
    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        report = measure(opened, labels=labels, rank=rank, progress=progress)
    if as_json:
        emit_json(report.as_dict())
        return
    rows = []
    for pair in report.pairs:
        for role, m in [("all", pair.overall), *pair.by_role.items()]:
            rows.append([f"{pair.packs[0]} / {pair.packs[1]}", role, str(m.parameters), f"{m.cosine:+.3f}",
                         f"{m.sign_conflict:.3f}", f"{m.norm_ratio:.2f}",
                         "-" if m.overlap is None else f"{m.overlap:.3f} ({m.chance:.3f})", m.verdict])
    print_table(["pair", "role", "params", "cosine", "sign conflict", "norm ratio", "overlap (chance)", "verdict"], rows)
    click.echo(plain(f"Verdict: {report.verdict}: {report.explanation}"))
