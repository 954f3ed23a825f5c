"""The ``skillhub`` command line; the only module that prints or exits."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from skillhub import __version__, config
from skillhub.errors import SkillhubError
from skillhub.progress import ProgressCallback


class SkillhubGroup(click.Group):
    """Turns every SkillhubError into one ``Error: ...`` line and exit status 1, in one place.

    Usage errors keep click's exit status 2; any other exception is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SkillhubError as exc:
            if config.debug():
                raise
            click.echo(f"Error: {plain(str(exc))}", err=True)
            ctx.exit(1)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: object) -> str:
    """``text`` as one line with no control characters: names and messages come from files and
    repos, and an escape sequence must never reach the terminal (nor a newline split a line)."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\n\r\t" else "?", str(text))


def _markup_safe(text: object) -> str:
    """:func:`plain`, with rich markup escaped (a name like ``[/bold]`` is text, not a tag)."""
    from rich.markup import escape

    return escape(plain(text))


class RedactingFilter(logging.Filter):
    """Removes credentials from every log record: at -vv the HTTP libraries log request and
    response headers verbatim, and a server may echo the Authorization header back."""

    _SECRETS = (
        re.compile(r"(?i)(authorization['\"]?\s*[,:=]\s*b?['\"]?)[^'\"\s)]+(\s+[^'\"\s)]+)?"),
        re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"),
        re.compile(r"\bhf_[A-Za-z0-9_]{6,}"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern in self._SECRETS:
            message = pattern.sub(lambda m: (m.group(1) if m.re.groups else "") + "[redacted]", message)
        record.msg, record.args = message, None
        return True


# rich is imported where a table or bar is drawn: `--json` listings should not pay for it.


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _stdout():
    from rich.console import Console

    # Piped or captured output has no terminal width; rich would then squeeze tables to 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _table(**options):
    from rich.table import Table

    return Table(**options)


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr, fed by the library's progress callback.

    Only on a terminal: piped or captured stderr gets no bar (and no stray newline before an
    ``Error:`` line).
    """
    console = _stderr()
    if not enabled or not console.is_terminal:
        yield lambda description, completed, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, completed: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=completed, total=total)

        yield update


def _wants_json(ctx: click.Context, local: bool) -> bool:
    return local or bool(ctx.find_root().params.get("as_json"))


def _emit_json(document: Any) -> None:
    # Indented for a person at a terminal; compact when piped, where json's C encoder applies
    # (indentation forces the pure-Python one: 0.3 s for a 10,000-pack listing).
    import sys

    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(document, indent=indent))


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
force_option = click.option("--force", is_flag=True, help="Replace the output if it already exists.")


@click.group(cls=SkillhubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", "registry_location", metavar="DIR|URL",
              help="Registry directory or SQLAlchemy URL (default: $SKILLHUB_HOME or the user data dir).")
@click.option("--store", type=click.Path(path_type=Path), help="Directory of pack files (default: <registry>/packs).")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command that prints results.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.version_option(__version__, prog_name="skillhub")
def main(registry_location: str | None, store: Path | None, as_json: bool, verbose: int) -> None:
    """skillhub: compressed, removable fine-tune deltas (SkillPacks) for Hugging Face models."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Pack directory to create.")
@click.option("--task", help="Task the pack teaches (default: the pack name).")
@click.option("--name", help="Pack name (default: the output directory's name).")
@click.option("--pack-version", "version", default="1.0.0", show_default=True, help="Version of the pack.")
@click.option("--recipe", default="paper", show_default=True, help="'paper' or a recipe JSON file.")
@click.option("--ratio", type=float, help="Budget mode: store at most this fraction of the fp16 delta, settings chosen per module.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (JSONL with text/prompt, or plain text): GPTQ.")
@click.option("--calib-samples", default=128, show_default=True, help="Calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--parent", type=click.Path(path_type=Path), help="Pack this fine-tune started from (lineage).")
@click.option("--revision", "base_revision", help="Hub revision of BASE.")
@click.option("--tuned-revision", help="Hub revision of TUNED.")
@click.option("--device", default=None, help="Device for the compression maths: cpu, cuda, cuda:1 ...")
@click.option("--seed", default=0, show_default=True, help="Seed of randomized SVD.")
@force_option
@json_option
@click.pass_context
def create(ctx: click.Context, base: str, tuned: str, output: Path, task: str | None, name: str | None,
           version: str, recipe: str, ratio: float | None, calib: Path | None, calib_samples: int,
           calib_seqlen: int, parent: Path | None, base_revision: str | None,
           tuned_revision: str | None, device: str | None, seed: int, force: bool, as_json: bool) -> None:
    """Compress TUNED - BASE into a SkillPack directory.

    BASE and TUNED are local Hugging Face model directories or Hub ids.
    """
    from skillhub.compress.pipeline import create_pack

    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        pack = create_pack(
            base, tuned, output, task=task, name=name, version=version, recipe=recipe, ratio=ratio, calib=calib,
            calib_samples=calib_samples, calib_seqlen=calib_seqlen, parent=parent,
            base_revision=base_revision, tuned_revision=tuned_revision, device=device or config.default_device(),
            seed=seed, force=force, progress=progress,
        )
    summary = _pack_summary(pack)
    if as_json:
        _emit_json(summary)
        return
    totals = summary["totals"]
    click.echo(
        f"Wrote {pack.path}: {totals['modules']} modules, {totals['stored_bytes']:,} bytes stored for a "
        f"{totals['delta_fp16_bytes']:,}-byte fp16 delta (ratio {totals['ratio']:.2%}), "
        f"relative error {totals['relative_error']:.4f}"
    )


def _pack_summary(pack: Any) -> dict[str, Any]:
    manifest = pack.manifest
    from skillhub.pack.manifest import MANIFEST_FILE

    disk_bytes = sum((pack.path / name).stat().st_size for name in (MANIFEST_FILE, *manifest["files"]))
    totals = dict(manifest["totals"])
    totals["disk_bytes"] = disk_bytes
    totals["disk_ratio"] = disk_bytes / totals["delta_fp16_bytes"] if totals["delta_fp16_bytes"] else 0.0
    return {
        "path": str(pack.path),
        "name": manifest["name"],
        "task": manifest["task"],
        "version": manifest["version"],
        "base": manifest["base"],
        "recipe": manifest["recipe"]["name"],
        "quantizer": manifest["quantizer"],
        "modules": [
            {"name": name, **{k: entry[k] for k in ("role", "operator", "operator_version", "params", "meta",
                                                     "shape", "stored_bytes", "delta_fp16_bytes", "error")}}
            for name, entry in manifest["modules"].items()
        ],
        "unchanged": manifest["unchanged"],
        "files": manifest.get("files", {}),
        "totals": totals,
    }


def _short_params(params: dict[str, Any], meta: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k in ("keep", "bits", "dtype", "rank", "rank_fraction", "energy")}
    if "groups" in meta:
        shown["groups"] = "/".join(f"{r}@{b}b" for r, b in meta["groups"])
    elif "rank" in meta:
        shown["rank"] = meta["rank"]
    return " ".join(f"{k}={v}" for k, v in shown.items())


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@json_option
@click.pass_context
def inspect(ctx: click.Context, pack: Path, as_json: bool) -> None:
    """Show what a SkillPack holds: per module role, operator, params, bytes and error."""
    from skillhub.pack.format import load_pack

    summary = _pack_summary(load_pack(pack))
    if _wants_json(ctx, as_json):
        _emit_json(summary)
        return
    console = _stdout()
    base, safe = summary["base"], _markup_safe  # every string below comes from the pack's files
    console.print(f"[bold]{safe(summary['name'])}[/bold] {safe(summary['version'])}  "
                  f"task [bold]{safe(summary['task'])}[/bold]  recipe {safe(summary['recipe'])}  "
                  f"quantizer {safe(summary['quantizer']['method'])}")
    console.print(safe(f"base {base['id']} ({base['architecture']}, {base['dtype']})  {base['fingerprint']}"))
    table = _table(show_edge=False)
    for column in ("module", "role", "operator", "params", "bytes", "ratio", "error"):
        table.add_column(column, justify="right" if column in ("bytes", "ratio", "error") else "left")
    for module in summary["modules"]:
        table.add_row(safe(module["name"]), safe(module["role"]), safe(module["operator"]),
                      safe(_short_params(module["params"], module["meta"])),
                      f"{module['stored_bytes']:,}", f"{module['stored_bytes'] / module['delta_fp16_bytes']:.2%}",
                      f"{module['error']:.4f}")
    console.print(table)
    totals = summary["totals"]
    console.print(
        f"{totals['modules']} modules ({len(summary['unchanged'])} unchanged), {totals['parameters']:,} parameters; "
        f"stored {totals['stored_bytes']:,} of {totals['delta_fp16_bytes']:,} fp16 delta bytes "
        f"(ratio {totals['ratio']:.2%}); on disk {totals['disk_bytes']:,} bytes ({totals['disk_ratio']:.2%}); "
        f"relative error {totals['relative_error']:.4f}"
    )


@main.command()
@click.argument("base")
@click.argument("packs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--revision", "base_revision", help="Hub revision of BASE.")
@force_option
@json_option
@click.pass_context
def apply(ctx: click.Context, base: str, packs: tuple[Path, ...], output: Path, base_revision: str | None,
          force: bool, as_json: bool) -> None:
    """Write BASE + sum of PACKS as a Hugging Face checkpoint (no registry involved)."""
    from skillhub.activation import apply_packs

    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        written = apply_packs(base, list(packs), output, base_revision=base_revision, force=force, progress=progress)
    if as_json:
        _emit_json({"output": str(written), "packs": [str(p) for p in packs]})
    else:
        click.echo(f"Wrote {written} = {base} + {len(packs)} pack(s); load it with AutoModelForCausalLM.from_pretrained")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Where the models, packs and registry go (replaced).")
@click.option("--fast", is_flag=True, help="Fewer training steps and test prompts (about a minute; for tests).")
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path, fast: bool, as_json: bool) -> None:
    """The embedded end to end: three tasks in sequence, forgetting of fine-tuning vs skillhub, unlearning."""
    from skillhub.demo.run import run_demo

    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        result = run_demo(workdir, fast=fast, progress=progress)
    if as_json:
        _emit_json(result)
        return
    click.echo(format_demo(result))


def format_demo(result: dict[str, Any]) -> str:
    """The demo's report: forgetting tables side by side, unlearning, where things are."""
    matrices = result["matrices"]
    removal = result["removal"]
    lines = [
        f"Tasks learned in sequence: {', '.join(result['tasks'])} "
        f"({result['train_steps']} fine-tuning steps each, exact match on {result['test_examples']} held-out prompts)",
        "",
        format_forgetting(matrices),
        "",
        f"Unlearning: removed the pack of task {removal['task']} ({removal['pack']}); scores under each task's own set:",
        "| task | before | after | base |",
        "|---|---:|---:|---:|",
    ]
    base_of = dict(zip(matrices["tasks"], matrices["base"]))
    for task in result["tasks"]:
        lines.append(f"| {task} | {removal['before'][task]:.2f} | {removal['after'][task]:.2f} | {base_of[task]:.2f} |")
    lines += [
        "",
        "Packs: " + ", ".join(f"{t} {p['id']} ({p['ratio']:.2%} of its fp16 delta)" for t, p in result["packs"].items()),
        f"Registry: {result['paths']['registry']}  (try: skillhub --registry {result['paths']['registry']} log)",
        f"Packs: {result['paths']['packs']}",
        f"Plot: {result['paths']['plot'] or 'not written (pip install matplotlib)'}",
    ]
    return "\n".join(lines)


@main.group()
def bench() -> None:
    """Benchmarks to run on your own checkpoints."""


@bench.command("compress")
@click.argument("base")
@click.argument("tuned")
@click.option("--ratio", type=float, default=1 / 16, show_default=True, help="Byte budget as a fraction of the fp16 delta.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text: half fits GPTQ, half is held out.")
@click.option("--calib-samples", default=64, show_default=True, help="Calibration windows (split in two halves).")
@click.option("--calib-seqlen", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="JSONL prompt/answer set: accuracy retention.")
@click.option("--device", default=None, help="Device for the compression maths.")
@json_option
@click.pass_context
def bench_compress(ctx: click.Context, base: str, tuned: str, ratio: float, calib: Path | None, calib_samples: int,
                   calib_seqlen: int, eval_file: Path | None, device: str | None, as_json: bool) -> None:
    """Compare the paper recipe, budget mode and baselines at equal bytes on TUNED - BASE."""
    from skillhub.evaluation.benchmark import compare_compression

    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        report = compare_compression(base, tuned, ratio=ratio, calib=calib, calib_samples=calib_samples,
                                     calib_seqlen=calib_seqlen, eval_file=eval_file,
                                     device=device or config.default_device(), progress=progress)
    if as_json:
        _emit_json(report)
        return
    click.echo(format_compress_report(report))


def format_compress_report(report: dict[str, Any]) -> str:
    """The benchmark as a Markdown table (what the README shows)."""
    with_accuracy = "tuned_accuracy" in report
    header = "| method | bytes | ratio | held-out relative output error |" + (" accuracy | retention |" if with_accuracy else "")
    rule = "|---|---:|---:|---:|" + ("---:|---:|" if with_accuracy else "")
    lines = [
        f"{report['matrices']} attention/MLP matrices, {report['delta_fp16_bytes']:,} fp16 delta bytes, "
        f"budget ratio {report['ratio']:.4f}; error on {report['error_measure']}; quantizer {report['quantizer']}",
        "",
        header,
        rule,
    ]
    for row in report["methods"]:
        line = (f"| {row['method']} | {row['bytes']:,} | {row['ratio']:.2%} | {row['heldout_relative_error']:.4f} |")
        if with_accuracy:
            line += f" {row['accuracy']:.1%} | {row['retention']:.1%} |"
        lines.append(line)
    if with_accuracy:
        lines.append(f"\nfine-tuned model (uncompressed delta): {report['tuned_accuracy']:.1%}")
    return "\n".join(lines)


def _registry(ctx: click.Context):
    from skillhub.registry.front import Registry

    root = ctx.find_root().params
    return Registry(root.get("registry_location"), store=root.get("store"))


def _print_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    table = _table(title=_markup_safe(title) if title else None, show_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_markup_safe(cell) for cell in row))  # names and paths come from the registry
    _stdout().print(table)


@main.command()
@json_option
@click.pass_context
def init(ctx: click.Context, as_json: bool) -> None:
    """Create (or upgrade) the registry and show where it is."""
    registry = _registry(ctx)
    if _wants_json(ctx, as_json):
        _emit_json({"registry": registry.display_url, "store": str(registry.store.root)})
    else:
        click.echo(f"Registry ready at {registry.display_url} (packs in {registry.store.root})")


@main.command()
@click.argument("pack", required=False, type=click.Path(path_type=Path))
@click.option("--from", "from_models", nargs=2, metavar="BASE TUNED", help="Create the pack from a fine-tune first.")
@click.option("--task", required=True, help="The task the pack teaches.")
@click.option("--base", help="Registered base model the pack must belong to.")
@click.option("--new-base", is_flag=True, help="Start a lineage for the pack's base even if other bases exist.")
@click.option("--base-location", help="Where the base weights are, for activation (default: the id in the pack).")
@click.option("--recipe", default="paper", show_default=True, help="With --from: 'paper' or a recipe JSON file.")
@click.option("--ratio", type=float, help="With --from: budget mode.")
@click.option("--calib", type=click.Path(path_type=Path), help="With --from: calibration text for GPTQ.")
@click.option("--calib-samples", default=128, show_default=True)
@click.option("--calib-seqlen", default=512, show_default=True)
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Eval set of the task (as `task add`).")
@click.option("--metric", type=click.Choice(["exact_match", "perplexity"]), default="exact_match", show_default=True)
@click.option("--no-eval", is_flag=True, help="Do not score the registered tasks after adding.")
@json_option
@click.pass_context
def add(ctx: click.Context, pack: Path | None, from_models: tuple[str, str] | None, task: str, base: str | None,
        new_base: bool, base_location: str | None, recipe: str, ratio: float | None, calib: Path | None,
        calib_samples: int, calib_seqlen: int, eval_file: Path | None, metric: str, no_eval: bool,
        as_json: bool) -> None:
    """Add PACK (or a pack made --from BASE TUNED) to the registry as task T, then score every task."""
    import tempfile

    if (pack is None) == (from_models is None):
        raise click.UsageError("give either PACK or --from BASE TUNED")
    registry = _registry(ctx)
    as_json = _wants_json(ctx, as_json)
    if eval_file is not None:
        from skillhub.evaluation.datasets import load_eval_set

        load_eval_set(eval_file, metric)  # a bad eval file stops the add before anything is written
    if from_models is not None:
        from skillhub.compress.pipeline import create_pack

        with tempfile.TemporaryDirectory(prefix="skillhub-add-") as tmp, _progress(not as_json) as progress:
            made = create_pack(*from_models, Path(tmp) / task, task=task, recipe=recipe, ratio=ratio, calib=calib,
                               calib_samples=calib_samples, calib_seqlen=calib_seqlen, progress=progress)
            entry = registry.add(made, task=task, base=base, new_base=new_base,
                                 base_location=base_location or from_models[0])
    else:
        entry = registry.add(pack, task=task, base=base, new_base=new_base, base_location=base_location)
    if eval_file is not None:
        registry.add_task(task, eval_file, metric=metric, base=entry["base"])
    if not no_eval:
        from skillhub.evaluation.forgetting import evaluate_tasks

        with _progress(not as_json) as progress:
            entry["scores"] = evaluate_tasks(registry, base=entry["base"], step=entry["event"], progress=progress)
    if as_json:
        _emit_json(entry)
        return
    click.echo(f"Added pack {entry['id']} ({entry['name']} {entry['version']}) for task {entry['task']} "
               f"of base {entry['base']}")
    if entry.get("scores"):
        _print_scores(entry["scores"])


def _print_scores(records: list[dict[str, Any]]) -> None:
    by_task: dict[str, dict[str, float]] = {}
    for record in records:
        by_task.setdefault(record["task"], {})[record["policy"]] = record["score"]
    _print_table(["task", "own set (Eq. 10)", "all packs fused", "base"],
                 [[t, *(f"{s[p]:.3f}" if p in s else "-" for p in ("subset", "fused", "base"))]
                  for t, s in by_task.items()])


@main.command("list")
@click.option("--base", help="Only this base model's packs.")
@click.option("--all", "include_removed", is_flag=True, help="Include removed packs.")
@json_option
@click.pass_context
def list_packs(ctx: click.Context, base: str | None, include_removed: bool, as_json: bool) -> None:
    """List the packs of the registry, oldest first."""
    packs = _registry(ctx).list_packs(base=base, include_removed=include_removed)
    if _wants_json(ctx, as_json):
        _emit_json(packs)
        return
    _print_table(["id", "name", "version", "task", "base", "bytes", "ratio", "state"],
                 [[p["id"], p["name"], p["version"], p["task"], p["base"], f"{p['bytes']:,}", f"{p['ratio']:.2%}",
                   p["state"] + (" (purged)" if p["purged"] else "")] for p in packs])


@main.command()
@click.argument("pack_id")
@json_option
@click.pass_context
def show(ctx: click.Context, pack_id: str, as_json: bool) -> None:
    """Show one pack of the registry."""
    entry = _registry(ctx).show(pack_id)
    if _wants_json(ctx, as_json):
        _emit_json(entry)
        return
    for key in ("id", "name", "version", "task", "base", "state", "bytes", "ratio", "parent", "added_at", "path"):
        click.echo(f"{key:>9}: {entry[key]}")
    click.echo(f"{'in tasks':>9}: {', '.join(entry['in_tasks']) or '-'}")


@main.command()
@click.option("--base", help="Only this base model's lineage.")
@json_option
@click.pass_context
def log(ctx: click.Context, base: str | None, as_json: bool) -> None:
    """The lineage: every add, remove and task-set change, oldest first."""
    events = _registry(ctx).log(base=base)
    if _wants_json(ctx, as_json):
        _emit_json(events)
        return
    for e in events:
        what = " ".join(f"{k}={v}" for k, v in e["detail"].items())
        click.echo(f"{e['id']:>5} {e['at'][:19]} {e['base']} {e['kind']:<8} {e['pack'] or '-':<12} "
                   f"{e['task'] or '-'} {what} ({e['actor']})")


@main.group()
def task() -> None:
    """Tasks and their activation sets."""


@task.command("list")
@click.option("--base", help="Base model (needed when the registry holds several).")
@json_option
@click.pass_context
def task_list(ctx: click.Context, base: str | None, as_json: bool) -> None:
    """Every task with the packs of its activation set."""
    tasks = _registry(ctx).tasks(base=base)
    if _wants_json(ctx, as_json):
        _emit_json(tasks)
        return
    _print_table(["task", "activation set", "chosen"],
                 [[t["name"], ", ".join(t["packs"]) or "(base only)", "explicit" if t["explicit"] else "default"]
                  for t in tasks])


@task.command("add")
@click.argument("name")
@click.option("--eval", "eval_file", required=True, type=click.Path(path_type=Path),
              help="JSONL eval set: {prompt, answer} for exact_match, {text} for perplexity.")
@click.option("--metric", type=click.Choice(["exact_match", "perplexity"]), default="exact_match", show_default=True)
@click.option("--base", help="Base model (needed when the registry holds several).")
@json_option
@click.pass_context
def task_add(ctx: click.Context, name: str, eval_file: Path, metric: str, base: str | None, as_json: bool) -> None:
    """Give task NAME an eval set, scored at every later addition."""
    result = _registry(ctx).add_task(name, eval_file, metric=metric, base=base)
    if _wants_json(ctx, as_json):
        _emit_json(result)
    else:
        click.echo(f"Task {name}: eval set {result['eval']} ({result['metric']}, sha256 {result['sha256'][:12]})")


@task.command("set")
@click.argument("name")
@click.option("--packs", required=True, help="Comma-separated pack ids (empty: the base alone).")
@click.option("--base", help="Base model (needed when the registry holds several).")
@json_option
@click.pass_context
def task_set(ctx: click.Context, name: str, packs: str, base: str | None, as_json: bool) -> None:
    """Make the activation set of task NAME exactly --packs."""
    ids = [p.strip() for p in packs.split(",") if p.strip()]
    result = _registry(ctx).set_task(name, ids, base=base)
    if _wants_json(ctx, as_json):
        _emit_json(result)
    else:
        click.echo(f"Task {name}: {', '.join(result['packs']) or '(base only)'}")


@main.command()
@click.option("--task", "task_name", help="Activate this task's set S_t.")
@click.option("--packs", help="Or: comma-separated pack ids.")
@click.option("--base", help="Registered base model (needed when the registry holds several).")
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@force_option
@json_option
@click.pass_context
def activate(ctx: click.Context, task_name: str | None, packs: str | None, base: str | None, base_path: str | None,
             output: Path, force: bool, as_json: bool) -> None:
    """Write theta_base + sum of the activation set as a Hugging Face checkpoint (Eq. 10)."""
    if (task_name is None) == (packs is None):
        raise click.UsageError("give exactly one of --task or --packs")
    ids = [p.strip() for p in packs.split(",") if p.strip()] if packs is not None else None
    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        written = _registry(ctx).activate(output, task=task_name, packs=ids, base=base, base_location=base_path,
                                          force=force, progress=progress)
    if as_json:
        _emit_json({"output": str(written)})
    else:
        click.echo(f"Wrote {written}; load it with AutoModelForCausalLM.from_pretrained")


@main.command()
@click.argument("pack_id")
@click.option("--purge", is_flag=True, help="Also delete the pack's files from the store.")
@json_option
@click.pass_context
def remove(ctx: click.Context, pack_id: str, purge: bool, as_json: bool) -> None:
    """Unlearn a pack: remove it from the lineage and from every activation set."""
    entry = _registry(ctx).remove(pack_id, purge=purge)
    if _wants_json(ctx, as_json):
        _emit_json(entry)
    else:
        click.echo(f"Removed pack {entry['id']} ({entry['name']} {entry['version']})" + (", files purged" if purge else ""))


@main.command()
@click.argument("pack_id", required=False)
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hub model repo (created if missing).")
@click.option("--revision", help="Branch to commit to (created from the default branch if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--lineage", is_flag=True, help="Publish every active pack of a base model, each in a folder, with lineage.json.")
@click.option("--base", help="With --lineage: the base model (needed when the registry holds several).")
@json_option
@click.pass_context
def push(ctx: click.Context, pack_id: str | None, repo_id: str, revision: str | None, private: bool,
         message: str | None, lineage: bool, base: str | None, as_json: bool) -> None:
    """Publish PACK_ID (a registry pack id, or a pack directory) to a Hub model repo, tagged v<version>.

    Authentication: HF_TOKEN or the token of `hf auth login`, as for any Hugging Face tool.
    """
    from skillhub.sharing import push_lineage, push_pack

    if lineage == (pack_id is not None):
        raise click.UsageError("give PACK_ID, or --lineage to publish every active pack")
    if base is not None and not lineage:
        raise click.UsageError("--base goes with --lineage")
    registry = _registry(ctx)
    if lineage:
        result = push_lineage(repo_id, registry=registry, base=base, revision=revision, private=private,
                              message=message)
    else:
        result = push_pack(pack_id, repo_id, registry=registry, revision=revision, private=private, message=message)
    if _wants_json(ctx, as_json):
        _emit_json(result)
    elif lineage:
        click.echo(f"Pushed {len(result['lineage']['packs'])} packs and lineage.json to {result['url']} "
                   f"({result['revision']} at {result['commit'][:12]})")
    else:
        done = "already published" if result["unchanged"] else "pushed"
        click.echo(f"{result['name']} {result['version']} {done}: {result['url']} tag {result['tag']} "
                   f"(commit {result['commit'][:12]})")


@main.command()
@click.argument("reference", metavar="OWNER/NAME[@REV]")
@click.option("--path", "folder", metavar="FOLDER", help="Folder of the repo that holds the pack or lineage.")
@click.option("--no-register", is_flag=True, help="Only download and verify, into -o DIR.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="With --no-register: directory to create (default: ./<pack name>).")
@click.option("--base", help="Registered base model the packs must belong to.")
@click.option("--new-base", is_flag=True, help="Start a lineage for the packs' base even if other bases exist.")
@click.option("--base-location", help="Where the base weights are, for activation (default: the id in the pack).")
@click.option("--no-eval", is_flag=True, help="Do not score the registered tasks after adding.")
@force_option
@json_option
@click.pass_context
def pull(ctx: click.Context, reference: str, folder: str | None, no_register: bool, output: Path | None,
         base: str | None, new_base: bool, base_location: str | None, no_eval: bool, force: bool,
         as_json: bool) -> None:
    """Download a pack (or a lineage, in order) from the Hub, verify it, and add it to the registry.

    REV may be a branch, a tag or a commit id. Every file is checked against the sha256 in
    its manifest and the base fingerprint against the registered base model; a failed pull
    registers nothing.
    """
    from skillhub.sharing import pull_pack

    if (output is not None or force) and not no_register:
        raise click.UsageError("-o/--output and --force go with --no-register (registered packs live in the store)")
    as_json = _wants_json(ctx, as_json)
    registry = None if no_register else _registry(ctx)
    with _progress(not as_json) as progress:
        result = pull_pack(reference, registry=registry, path=folder, register=not no_register, output=output,
                           force=force, base=base, new_base=new_base, base_location=base_location,
                           progress=progress)
    added = [p["entry"] for p in result["packs"] if p["status"] == "added"]
    if added and not no_eval:
        from skillhub.evaluation.forgetting import evaluate_tasks

        with _progress(not as_json) as progress:
            result["scores"] = evaluate_tasks(registry, base=added[-1]["base"], step=added[-1]["event"],
                                              progress=progress)
    if as_json:
        _emit_json(result)
        return
    for pack in result["packs"]:
        where = f" as {pack['entry']['id']}" if "entry" in pack else ""
        click.echo(f"{pack['name']} {pack['version']}: {pack['status']}{where}")
    click.echo(f"from {result['repo']}@{result['revision']} (commit {result['commit'][:12]})"
               + (f" into {result['output']}" if "output" in result else ""))
    if result.get("scores"):
        _print_scores(result["scores"])


@main.command()
@click.option("--check", is_flag=True, help="Exit 1 if any plugin is broken or conflicts with another.")
@json_option
@click.pass_context
def plugins(ctx: click.Context, check: bool, as_json: bool) -> None:
    """List every compression operator: version, distribution, built-in or plugin, params schema.

    Broken plugins (import errors, contract violations) and name conflicts are listed with
    their error; SKILLHUB_LOAD_PLUGINS=a,b limits which plugins load (empty: built-ins only).
    """
    from skillhub.operators.discovery import catalog, report

    rows = report()
    allowlist = catalog().allowlist
    if _wants_json(ctx, as_json):
        _emit_json({"allowlist": list(allowlist) if allowlist is not None else None, "operators": rows})
    else:
        _print_table(
            ["operator", "version", "distribution", "kind", "status", "params"],
            [[r["name"], r["version"] or "-", f"{r['distribution']} {r['distribution_version']}",
              "built-in" if r["builtin"] else "plugin", r["status"], _schema_summary(r["params_schema"])]
             for r in rows],
            title="Compression operators",
        )
        for r in rows:
            if r["error"] and r["status"] != "filtered":
                click.echo(f"{r['name']} ({r['distribution']}): {r['error']}", err=True)
        if allowlist is not None:
            click.echo(f"SKILLHUB_LOAD_PLUGINS={','.join(allowlist)}: other plugins are not loaded", err=True)
    problems = [r for r in rows if r["status"] in ("broken", "conflict")]
    if check and problems:
        raise SkillhubError(f"{len(problems)} operator entry point(s) are broken or conflict: "
                            + ", ".join(f"{r['name']} ({r['distribution']})" for r in problems))


def _schema_summary(schema: dict[str, Any] | None) -> str:
    # name=default for each param; the full schema is in --json.
    if not schema:
        return "-"
    required = set(schema.get("required", []))
    parts = []
    for key, spec in schema.get("properties", {}).items():
        shown = f"{key}={json.dumps(spec['default'])}" if "default" in spec else key
        parts.append(shown + ("*" if key in required else ""))
    return ", ".join(parts) or "(none)"


@main.command()
@click.option("--repair", is_flag=True, help="Delete unreferenced stored packs and interrupted writes.")
@json_option
@click.pass_context
def doctor(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Verify every stored pack against the registry database."""
    report = _registry(ctx).doctor(repair=repair)
    if _wants_json(ctx, as_json):
        _emit_json(report)
    else:
        click.echo(f"{report['checked']} pack(s) checked: " + ("consistent" if report["consistent"] else "INCONSISTENT"))
        for problem in report["problems"]:
            click.echo(f"  problem: pack {problem['pack']}: {problem['problem']}")
        for orphan in report["orphans"]:
            click.echo(f"  leftover: stored pack {orphan[:12]} is not referenced (doctor --repair deletes it)")
        for leftover in report["leftovers"]:
            click.echo(f"  leftover: interrupted write {leftover} (doctor --repair deletes it)")
        for done in report["repaired"]:
            click.echo(f"  repaired: {done}")
        for left in report["kept"]:
            click.echo(f"  kept: {left}")
    if not report["consistent"]:
        ctx.exit(1)


@main.command("eval")
@click.option("--task", "task_name", help="Only this task (default: every task with an eval set).")
@click.option("--base", help="Base model (needed when the registry holds several).")
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@json_option
@click.pass_context
def eval_command(ctx: click.Context, task_name: str | None, base: str | None, base_path: str | None,
                 as_json: bool) -> None:
    """Score tasks now under their own set, all packs fused, and the base; record the scores."""
    from skillhub.evaluation.forgetting import evaluate_tasks

    as_json = _wants_json(ctx, as_json)
    with _progress(not as_json) as progress:
        records = evaluate_tasks(_registry(ctx), base=base, task=task_name, base_location=base_path,
                                 progress=progress)
    if as_json:
        _emit_json(records)
    elif records:
        _print_scores(records)
    else:
        click.echo("No task has an eval set yet: `skillhub task add T --eval FILE`")


@main.command()
@click.option("--base", help="Base model (needed when the registry holds several).")
@click.option("--plot", type=click.Path(path_type=Path), help="Also write heatmaps of R to this PNG (matplotlib).")
@json_option
@click.pass_context
def metrics(ctx: click.Context, base: str | None, plot: Path | None, as_json: bool) -> None:
    """The accuracy matrix R[k][j] per policy, with ACC, BWT, FWT and average forgetting."""
    from skillhub.evaluation.forgetting import accuracy_matrices, plot_matrices

    if plot is not None and not plot.parent.is_dir():
        raise SkillhubError(f"cannot write the plot to {plot}: directory {plot.parent} does not exist")
    result = accuracy_matrices(_registry(ctx), base=base)
    if plot is not None:
        plot_matrices(result, str(plot))
    if _wants_json(ctx, as_json):
        _emit_json(result)
        return
    click.echo(format_forgetting(result))
    if plot is not None:
        click.echo(f"\nPlot written to {plot}")


def format_forgetting(result: dict[str, Any]) -> str:
    """The accuracy matrices and metrics as Markdown (policies side by side, definitions below)."""
    tasks = result["tasks"]
    labels = {"subset": "skillhub, each task's own activation set (Eq. 10)", "fused": "skillhub, all packs merged (Eq. 9)"}
    policies = {labels.get(name, name): data for name, data in result["policies"].items()}
    lines = ["R[k][j]: score on task j (columns) after learning task k (rows); base b = "
             + ", ".join(f"{t} {'-' if b is None else f'{b:.2f}'}" for t, b in zip(tasks, result["base"])), ""]
    for label, data in policies.items():
        lines.append(f"{label}:")
        lines.append("| after \\ task | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        for task, row in zip(tasks, data["R"]):
            lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    names = ["ACC", "BWT", "FWT", "forgetting"]
    lines.append("| policy | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for label, data in policies.items():
        if data["metrics"] is None:
            lines.append(f"| {label} | " + " | ".join("-" for _ in names) + " |")
            continue
        values = [data["metrics"][n] for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:+.3f}" for v in values) + " |")
    lines.append("")
    lines.extend(f"- {name}: {definition}" for name, definition in result["definitions"].items())
    return "\n".join(lines)
