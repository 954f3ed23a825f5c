"""The remaining commands: ``plugins`` and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from skillhub.cli.app import main
from skillhub.cli.options import json_option
from skillhub.cli.output import emit_json, format_forgetting, print_table, progress_bar, wants_json
from skillhub.errors import SkillhubError

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
    if wants_json(ctx, as_json):
        emit_json({"allowlist": list(allowlist) if allowlist is not None else None, "operators": rows})
    else:
        print_table(
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
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Where the models, packs and registry go (replaced).")
@click.option("--tiny", is_flag=True, help="The synthetic story on tiny models trained from scratch (for tests).")
@click.option("--fast", is_flag=True, help="With --tiny: fewer training steps and test prompts (about two minutes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, initialisation and training.")
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path, tiny: bool, fast: bool, seed: int, as_json: bool) -> None:
    """The end to end on real models from PyPI (SmolLM2-135M-Instruct, Gemma-3-270M): three skills
    fine-tuned and packed, no forgetting, routing with a base class, grafting from another
    architecture, unlearning, a PEFT export. --tiny: the synthetic story on tiny models."""
    if fast and not tiny:
        raise click.UsageError("--fast goes with --tiny")
    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        if tiny:
            from skillhub.demo.run import run_demo

            result = run_demo(workdir, fast=fast, seed=seed, progress=progress)
        else:
            from skillhub.demo.real import run_real_demo

            result = run_real_demo(workdir, seed=seed, progress=progress)
    if as_json:
        emit_json(result)
        return
    click.echo(format_demo(result) if tiny else format_real_demo(result))


def format_graft(graft: dict[str, Any]) -> list[str]:
    """The demo's grafting step: the task's score at each stage, and the other tasks untouched."""
    if "skipped" in graft:
        return [f"Grafting {graft['task']}: skipped ({graft['skipped']})"]
    dpo = "-" if graft["dpo"] is None else f"{graft['dpo']:.2f}"
    seconds = ", ".join(f"{stage} {s:.1f} s" for stage, s in graft["seconds"].items())
    unchanged = all(o["before"] == o["after"] for o in graft["others"].values())
    return [
        f"Grafting {graft['task']} from a {graft['source']['architecture']} source with its own tokenizer "
        f"({graft['sft_examples']} SFT examples, {graft['pairs']} DPO pairs; {seconds}):",
        "| source | target before | after SFT | after SFT+DPO | pack (own set) |",
        "|---:|---:|---:|---:|---:|",
        f"| {graft['source']['score']:.2f} | {graft['target_before']:.2f} | {graft['sft']:.2f} | {dpo} | "
        f"{graft['pack']:.2f} |",
        f"Pack {graft['pack_id']}: {graft['pack_bytes']:,} bytes ({graft['ratio']:.2%} of its fp16 delta). "
        "Other tasks under their own sets, before -> after adding it: "
        + ", ".join(f"{t} {o['before']:.2f} -> {o['after']:.2f}" for t, o in graft["others"].items())
        + (" (unchanged)" if unchanged else " (CHANGED)"),
    ]


def format_demo(result: dict[str, Any]) -> str:
    """The demo's report: per task retention, routing and merges; forgetting tables; unlearning; paths."""
    matrices, removal, final = result["matrices"], result["removal"], result["final"]
    merges = [m for m in ("fused", "ties", "dare-ties", "dare-linear", "task-arithmetic") if m in final]
    lines = [
        f"Tasks learned in sequence: {', '.join(result['tasks'])} ({result['train_steps']} fine-tuning steps each, "
        f"exact match on {result['test_examples']} held-out prompts; seed {result['seed']})",
        "",
        "Final scores: the full fine-tune, its pack under the task's own activation set (retained: pack / "
        "fine-tune), routed without the task label, and all packs in one static model (fused = summed):",
        "| task | fine-tune | pack (own set) | retained | routed | " + " | ".join(merges) + " |",
        "|---|" + "---:|" * (4 + len(merges)),
    ]
    for task in result["tasks"]:
        kept = result["retention"][task]
        retained = "-" if kept["retained"] is None else f"{kept['retained']:.0%}"
        lines.append(f"| {task} | {kept['fine-tune']:.2f} | {kept['pack']:.2f} | {retained} | "
                     f"{final['routed'][task]:.2f} | " + " | ".join(f"{final[m][task]:.2f}" for m in merges) + " |")
    if result["routing"]:
        accuracy = result["routing"]["accuracy"]
        lines += ["", f"Router (layer {result['routing']['layer']}): held-out routing accuracy "
                      f"{accuracy['heldout']:.4f} (train {accuracy['train']:.4f})"]
    lines += [
        "",
        format_forgetting(matrices),
        "",
        f"Unlearning: removed the pack of task {removal['task']} ({removal['pack']}); scores before -> after:",
        "| task | own set | routed | base |",
        "|---|---:|---:|---:|",
    ]
    before, after = removal["before"], removal["after"]
    for task in before["subset"]:
        routed = (f"{before['routed'][task]:.2f} -> {after['routed'][task]:.2f}"
                  if task in before.get("routed", {}) and task in after.get("routed", {}) else "-")
        lines.append(f"| {task} | {before['subset'][task]:.2f} -> {after['subset'][task]:.2f} | {routed} | "
                     f"{after['base'][task]:.2f} |")
    lines += ["", *format_graft(result["graft"])]
    lines += [
        "",
        "Packs: " + ", ".join(f"{t} {p['id']} ({p['ratio']:.2%} of its fp16 delta)" for t, p in result["packs"].items()),
        f"Registry: {result['paths']['registry']}  (try: skillhub --registry {result['paths']['registry']} route show)",
        f"Packs: {result['paths']['packs']}",
        f"Plot: {result['paths']['plot'] or 'not written (pip install matplotlib)'}",
    ]
    return "\n".join(lines)


def format_real_demo(result: dict[str, Any]) -> str:
    """The real-model demo's report: answers before and after, packs, forgetting, routing, grafting,
    unlearning, the PEFT export, and skillhub's scores against an independent scorer."""
    lines = [f"Base: SmolLM2-135M-Instruct ({result['base']}); skills fine-tuned on it: {', '.join(result['skills'])}; "
             f"grafted from Gemma-3-270M: {result['grafted']}  ({result['seconds']:.0f} s: "
             + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in result["stage_seconds"].items()) + ")", "",
             "Answers before (base) -> after (routed, no task label):"]
    for example in result["examples"]:
        after = example["after"]
        lines += [f"  {example['prompt']}", f"    before: {example['before']['output']!r}",
                  f"    after:  {after['output']!r}  [{after['task'] or 'base'}"
                  + (f", p={after['probability']:.2f}" if after["probability"] is not None else "") + "]"]
    lines += ["", "| task | fine-tune | pack (own set) | pack bytes | ratio of fp16 delta |", "|---|---:|---:|---:|---:|"]
    for task, kept in result["retention"].items():
        lines.append(f"| {task} | {kept['fine-tune']:.2f} | {kept['pack']:.2f} | {kept['bytes']:,} | {kept['ratio']:.2%} |")
    router = result["router"]
    lines += ["", f"Router: held-out accuracy {router['heldout_accuracy']:.2f}; with no task label, "
              + ", ".join(f"{k} {v:.0%} right" for k, v in router["correct"].items())]
    lines += [f"  Warning: {w}" for w in router["warnings"]]
    graft = result["graft"]
    if "skipped" in graft:
        lines += ["", f"Grafting {graft['task']}: skipped ({graft['skipped']})"]
    else:
        scores = graft["scores"]
        lines += ["", f"Grafting {graft['task']} from Gemma-3-270M ({graft['sft_examples']} SFT examples, "
                  f"{graft['pairs']} DPO pairs), eval set:",
                  "  " + "  ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in scores["eval"].items() if v is not None),
                  f"  held-out prompts ({scores['heldout_prompts']}): "
                  + "  ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in scores["heldout"].items() if v is not None)]
        if graft["warning"]:
            lines.append(f"  Warning: {graft['warning']}")
    lines += ["", format_forgetting(result["matrices"])]
    removal = result["removal"]
    lines += ["", f"Unlearning: removed {removal['task']} ({removal['pack']}): own-set scores before -> after: "
              + ", ".join(f"{t} {removal['before'][t]:.2f} -> {removal['after'][t]:.2f}" for t in removal["before"])
              + f" (the base scores {removal['base']:.2f} on {removal['task']})"]
    peft = result["peft"]
    lines += [f"PEFT: {peft['path']} (rank {peft['rank']}, {peft['adapter_bytes']:,} bytes), loaded by PEFT: its logits "
              f"off the pack's by {peft['relative_error']:.1e} of its effect"]
    lines += ["", "skillhub's exact match vs an independent scorer (apply_chat_template + generate, as text):"]
    lines += [f"  {t}: {s['skillhub']:.2f} vs {s['independent']:.2f} ({s['examples']} examples)"
              for t, s in result["independent"].items()]
    lines += ["", f"Registry: {result['paths']['registry']}"]
    return "\n".join(lines)
