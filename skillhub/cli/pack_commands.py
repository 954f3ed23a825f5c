"""Commands on packs without a registry: ``create``, ``inspect``, ``apply``, ``bench compress``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from skillhub.cli.app import main
from skillhub.cli.options import (base_revision_option, compression_options, force_option, json_option, merge_options,
                                  peft_source_options)
from skillhub.cli.output import emit_json, markup_safe, new_table, progress_bar, stdout, wants_json, warn_if_conflicting
from skillhub.compress.options import CompressionOptions

if TYPE_CHECKING:
    from skillhub.activation import Merge
    from skillhub.sharing.peft_import import PeftSource


@main.command()
@click.argument("base")
@click.argument("tuned", required=False)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Pack directory to create.")
@click.option("--task", help="Task the pack teaches (default: the pack name).")
@click.option("--name", help="Pack name (default: the output directory's name).")
@click.option("--pack-version", "version", default="1.0.0", show_default=True, help="Version of the pack.")
@compression_options()
@click.option("--parent", type=click.Path(path_type=Path), help="Pack this fine-tune started from (lineage).")
@base_revision_option
@click.option("--tuned-revision", help="Hub revision of TUNED.")
@click.option("--dry-run", is_flag=True, help="Print the plan (per module: operator, rank groups, bytes, predicted "
                                               "time and memory) from the checkpoints' headers; write nothing.")
@peft_source_options
@force_option
@json_option
@click.pass_context
def create(ctx: click.Context, base: str, tuned: str | None, output: Path, task: str | None, name: str | None,
           version: str, compression: CompressionOptions, parent: Path | None, base_revision: str | None,
           tuned_revision: str | None, dry_run: bool, from_peft: PeftSource | None, force: bool, as_json: bool) -> None:
    """Compress TUNED - BASE into a SkillPack directory (or make one from a PEFT LoRA adapter:
    BASE --from-peft ADAPTER).

    BASE and TUNED are local Hugging Face model directories or Hub ids.
    """
    from skillhub.compress.pipeline import create_pack

    if (tuned is None) == (from_peft is None):
        raise click.UsageError("give TUNED, or --from-peft ADAPTER instead")
    if from_peft is not None and (dry_run or parent or tuned_revision):
        raise click.UsageError("--dry-run, --parent and --tuned-revision do not go with --from-peft")
    as_json = wants_json(ctx, as_json)
    if dry_run:
        _print_plan(base, tuned, compression, base_revision, tuned_revision, as_json)
        return
    with progress_bar(not as_json) as progress:
        if from_peft is not None:
            from skillhub.sharing.peft_import import import_peft

            pack = import_peft(from_peft.adapter, base, output, task=task, name=name, version=version,
                               adapter_revision=from_peft.revision, base_revision=base_revision,
                               ignore_base_name=from_peft.ignore_base_name, force=force, progress=progress,
                               compression=compression if from_peft.compress else None)
        else:
            pack = create_pack(base, tuned, output, task=task, name=name, version=version, parent=parent,
                               base_revision=base_revision, tuned_revision=tuned_revision, force=force,
                               progress=progress, **compression.as_kwargs())
    summary = _pack_summary(pack)
    if as_json:
        emit_json(summary)
        return
    totals = summary["totals"]
    click.echo(
        f"Wrote {pack.path}: {totals['modules']} modules, {totals['stored_bytes']:,} bytes stored for a "
        f"{totals['delta_fp16_bytes']:,}-byte fp16 delta (ratio {totals['ratio']:.2%}), "
        f"relative error {totals['relative_error']:.4f}"
    )


def _print_plan(base: str, tuned: str, compression: CompressionOptions, base_revision: str | None,
                tuned_revision: str | None, as_json: bool) -> None:
    from skillhub.compress.estimate import estimate_pack

    plan = estimate_pack(base, tuned, base_revision=base_revision, tuned_revision=tuned_revision,
                         **compression.as_kwargs())
    if as_json:
        emit_json(plan)
        return
    table = new_table(title=f"create --dry-run: recipe {markup_safe(str(plan['recipe']))}, {plan['quantizer']}")
    for column in ("module", "role", "operator", "parts", "rank groups", "bytes", "seconds", "peak MB"):
        table.add_column(column, justify="right" if column in ("parts", "bytes", "seconds", "peak MB") else "left")
    for module in plan["modules"]:
        stored = module["stored_bytes"]
        table.add_row(markup_safe(module["name"]), module["role"], module["operator"], str(module["parts"]),
                      " ".join(f"{r}@{b}" for r, b in module["rank_groups"] or []) or "-",
                      "?" if stored is None else f"{'' if module['bytes_exact'] else '<='}{stored:,}",
                      f"{module['seconds']:.2f}", f"{module['peak_bytes'] / 2**20:,.0f}")
    stdout().print(table)
    totals = plan["totals"]
    exact = "" if totals["stored_bytes_exact"] else "at most "
    calibration = (f" (calibration: {totals['calibration_seconds']:,.0f} s, "
                   f"{totals['calibration_peak_bytes'] / 2**30:.2f} GiB)" if totals["calibration_peak_bytes"] else "")
    click.echo(f"{totals['modules']} modules: {exact}{totals['stored_bytes']:,} bytes stored; about "
               f"{totals['seconds']:,.0f} s of compression on this machine; peak resident memory about "
               f"{totals['peak_bytes'] / 2**30:.2f} GiB, {totals['floor_bytes'] / 2**30:.2f} GiB of it before the "
               f"first tensor{calibration}")


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
                                                     "shape", "stored_bytes", "delta_fp16_bytes", "error")},
             **({"split": entry["split"]} if "split" in entry else {})}
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
    elif "parts" in meta:  # stored as several matrices: their ranks
        ranks = [part.get("rank") for part in meta["parts"]]
        shown["parts"] = len(ranks)
        if all(isinstance(r, int) for r in ranks):
            shown["ranks"] = f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else ranks[0]
    return " ".join(f"{k}={v}" for k, v in shown.items())


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@json_option
@click.pass_context
def inspect(ctx: click.Context, pack: Path, as_json: bool) -> None:
    """Show what a SkillPack holds: per module role, operator, params, bytes and error."""
    from skillhub.pack.format import load_pack

    summary = _pack_summary(load_pack(pack))
    if wants_json(ctx, as_json):
        emit_json(summary)
        return
    console = stdout()
    base, safe = summary["base"], markup_safe  # every string below comes from the pack's files
    console.print(f"[bold]{safe(summary['name'])}[/bold] {safe(summary['version'])}  "
                  f"task [bold]{safe(summary['task'])}[/bold]  recipe {safe(summary['recipe'])}  "
                  f"quantizer {safe(summary['quantizer']['method'])}")
    console.print(safe(f"base {base['id']} ({base['architecture']}, {base['dtype']})  {base['fingerprint']}"))
    grid = new_table(show_edge=False)
    for column in ("module", "role", "operator", "params", "bytes", "ratio", "error"):
        grid.add_column(column, justify="right" if column in ("bytes", "ratio", "error") else "left")
    for module in summary["modules"]:
        grid.add_row(safe(module["name"]), safe(module["role"]), safe(module["operator"]),
                      safe(_short_params(module["params"], module["meta"])),
                      f"{module['stored_bytes']:,}", f"{module['stored_bytes'] / module['delta_fp16_bytes']:.2%}",
                      f"{module['error']:.4f}")
    console.print(grid)
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
@base_revision_option
@merge_options
@force_option
@json_option
@click.pass_context
def apply(ctx: click.Context, base: str, packs: tuple[Path, ...], output: Path, base_revision: str | None,
          merge: Merge | None, force: bool, as_json: bool) -> None:
    """Write BASE + sum (or --merge) of PACKS as a Hugging Face checkpoint (no registry involved)."""
    from skillhub.activation import apply_packs
    from skillhub.pack.format import load_pack

    as_json = wants_json(ctx, as_json)
    opened = [load_pack(p) for p in packs]
    if merge is None:
        warn_if_conflicting(opened)
    with progress_bar(not as_json) as progress:
        written = apply_packs(base, opened, output, base_revision=base_revision, force=force, merge=merge,
                              progress=progress)
    if as_json:
        emit_json({"output": str(written), "packs": [str(p) for p in packs]})
    else:
        click.echo(f"Wrote {written} = {base} + {len(packs)} pack(s); load it with AutoModelForCausalLM.from_pretrained")


@main.group()
def bench() -> None:
    """Benchmarks to run on your own checkpoints."""


@bench.command("compress")
@click.argument("base")
@click.argument("tuned")
@compression_options(ratio=1 / 16, calib_samples=64, calib_seqlen=256, with_recipe=False)
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="JSONL prompt/answer set: accuracy retention.")
@json_option
@click.pass_context
def bench_compress(ctx: click.Context, base: str, tuned: str, compression: CompressionOptions, eval_file: Path | None,
                   as_json: bool) -> None:
    """Compare the paper recipe, budget mode and baselines at equal bytes on TUNED - BASE.

    With --calib, half of the calibration windows fit GPTQ and the other half are held out.
    """
    from skillhub.evaluation.benchmark import compare_compression

    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        report = compare_compression(base, tuned, ratio=compression.ratio, calib=compression.calib,
                                     calib_samples=compression.calib_samples, calib_seqlen=compression.calib_seqlen,
                                     eval_file=eval_file, device=compression.device, progress=progress)
    if as_json:
        emit_json(report)
        return
    click.echo(format_compress_report(report))


def format_compress_report(report: dict[str, Any]) -> str:
    """The benchmark as a Markdown table (what docs/calibration.md shows)."""
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
