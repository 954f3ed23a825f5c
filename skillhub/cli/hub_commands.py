"""Sharing commands: ``push`` and ``pull`` (the Hub), ``export`` (a PEFT LoRA adapter for PEFT and vLLM)."""

from __future__ import annotations

from pathlib import Path

import click

from skillhub.cli.app import main, registry_of
from skillhub.cli.errors import plain
from skillhub.cli.options import base_option, base_revision_option, force_option, json_option
from skillhub.cli.output import emit_json, print_scores, progress_bar, wants_json

@main.command()
@click.argument("pack_id", required=False)
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hub model repo (created if missing).")
@click.option("--revision", help="Branch to commit to (created from the default branch if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--lineage", is_flag=True, help="Publish every active pack of a base model, each in a folder, with lineage.json.")
@base_option("With --lineage: the base model (needed when the registry holds several).")
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
    registry = registry_of(ctx)
    if lineage:
        result = push_lineage(repo_id, registry=registry, base=base, revision=revision, private=private,
                              message=message)
    else:
        result = push_pack(pack_id, repo_id, registry=registry, revision=revision, private=private, message=message)
    if wants_json(ctx, as_json):
        emit_json(result)
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
@base_option("Registered base model the packs must belong to.")
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
    as_json = wants_json(ctx, as_json)
    registry = None if no_register else registry_of(ctx)
    with progress_bar(not as_json) as progress:
        result = pull_pack(reference, registry=registry, path=folder, register=not no_register, output=output,
                           force=force, base=base, new_base=new_base, base_location=base_location,
                           evaluate=not no_eval, progress=progress)
    if as_json:
        emit_json(result)
        return
    for pack in result.packs:
        where = f" as {pack.entry.id}" if pack.entry else ""
        click.echo(f"{pack.name} {pack.version}: {pack.status}{where}")
    click.echo(f"from {result.repo}@{result.revision} (commit {result.commit[:12]})"
               + (f" into {result.output}" if result.output else ""))
    if result.scores:
        print_scores(result.scores)


@main.command()
@click.argument("pack")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter directory to create.")
@click.option("--format", "export_format", required=True, type=click.Choice(["peft"]),
              help="peft: a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors, model card).")
@click.option("--for", "consumer", type=click.Choice(["vllm"]),
              help="Keep to what vLLM loads (attention/MLP LoRA, rank <= 512, no modules_to_save); report the rest.")
@click.option("--max-rank", type=int, help="Largest LoRA rank (default: exact; 512 with --for vllm).")
@click.option("--embedding-rank", type=int, help="Embedding and head deltas as LoRA of this rank, not modules_to_save.")
@click.option("--base", "base_location", metavar="BASE",
              help="The pack's base model (default: the registered base of a pack id).")
@base_revision_option
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="dtype of the LoRA factors (default: the base model's).")
@click.option("--no-check", is_flag=True, help="Skip measuring the export's logits against the pack's.")
@force_option
@json_option
@click.pass_context
def export(ctx: click.Context, pack: str, output: Path, export_format: str, consumer: str | None, max_rank: int | None,
           embedding_rank: int | None, base_location: str | None, base_revision: str | None, dtype: str | None,
           no_check: bool, force: bool, as_json: bool) -> None:
    """Write PACK (a pack directory or a registry pack id) as a PEFT LoRA adapter that PEFT's
    PeftModel.from_pretrained and vLLM's --lora-modules load."""
    from skillhub.sharing.peft_export import export_peft

    as_json = wants_json(ctx, as_json)
    with progress_bar(not as_json) as progress:
        result = export_peft(pack, output, registry=registry_of(ctx), base=base_location, base_revision=base_revision,
                             max_rank=max_rank, embedding_rank=embedding_rank, for_vllm=consumer == "vllm",
                             dtype=dtype, check=not no_check, force=force, progress=progress)
    if as_json:
        emit_json(result)
        return
    click.echo(plain(f"Wrote {result.path}: LoRA rank {result.rank} on {result.target_modules} modules, "
                     f"modules_to_save: {', '.join(result.modules_to_save) or 'none'}; {result.adapter_bytes:,} "
                     f"bytes (pack {result.pack_bytes:,}, dense fp16 delta {result.dense_delta_fp16_bytes:,})"))
    for module in result.modules:
        if module.action == "dropped" or module.energy_lost > 0:
            what = "dropped" if module.action == "dropped" else f"truncated to rank {module.rank}"
            click.echo(plain(f"  {module.parameter} ({module.role}): {what}, {module.energy_lost:.1%} of its "
                             f"delta's energy lost" + (f" ({module.note})" if module.note else "")))
    for warning in result.warnings:
        click.echo(plain(f"  note: {warning}"))
    if result.check is not None:
        click.echo(f"Logits vs the pack ({result.check.tokens} random tokens): max |error| "
                   f"{result.check.max_abs_error:.3g}, {result.check.relative_error:.3g} of the pack's effect")
