"""Knowledge grafting on tiny models: a GPT-2 source with its own tokenizer, grafted into a Llama
target through real TRL trainers; scorers, pair strategies, resume, provenance and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from skillhub.cli import main
from skillhub.demo.synthetic import build_source_tokenizer, build_tiny_model, build_tokenizer, split_examples, write_jsonl
from skillhub.demo.train import finetune
from skillhub.scoring.scores import exact_match
from skillhub.progress import quiet_transformers

from conftest import GRAFT_TASK as TASK, Grafting



def score(model_dir: Path, test: list[dict[str, str]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return exact_match(model, AutoTokenizer.from_pretrained(model_dir), test)


# Settings that learn rot on these tiny models in seconds (the paper's are for 7B models).
LEARN = ["--temperature", "1.5", "--max-new-tokens", "8", "--min-score", "1", "--sft-lr", "5e-4", "--sft-epochs", "8",
         "--batch-size", "16", "--dpo-lr", "5e-5", "--dpo-epochs", "2"]
QUICK = ["--max-new-tokens", "8", "--sft-lr", "5e-4", "--sft-steps", "5", "--dpo-lr", "5e-5", "--dpo-steps", "3",
         "--batch-size", "8"]


def run(*args: object, registry: Path | None = None):
    prefix = ["--registry", str(registry)] if registry else []
    return CliRunner().invoke(main, [*prefix, *map(str, args)])


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_tokenizers_disagree_on_every_id() -> None:
    text = "rot abcxyz="
    target, source = build_tokenizer(), build_source_tokenizer()
    assert target.decode(target.encode(text, add_special_tokens=False)) == text
    assert source.decode(source.encode(text, add_special_tokens=False)) == text
    assert all(a != b for a, b in zip(target.encode(text, add_special_tokens=False),
                                      source.encode(text, add_special_tokens=False)))
    assert (target.bos_token, target.eos_token) != (source.bos_token, source.eos_token)


def test_graft_sft_dpo_add(grafting: Grafting, tmp_path: Path) -> None:
    """The whole graft, as a user runs it: the target learns what only the source could do."""
    registry = tmp_path / "registry"
    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.prompts, "-o", tmp_path / "rot",
                 "--task", TASK, *LEARN, "--add", "--eval", grafting.heldout, "--merged-policy", "none", "--json",
                 registry=registry)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ran"] == ["generate", "score", "sft", "pairs", "dpo", "pack", "check"] and report["reused"] == []
    assert report["pairs"] > 0 and report["dpo_skipped"] is None
    work = tmp_path / "rot.graft"
    assert report["removed"] == [str(work / "sft"), str(work / "dpo")] and not (work / "sft").exists()

    # Only text crossed: the GPT-2 source's responses, decoded with its own tokenizer, are mostly right.
    scored = lines_of(work / "scores.jsonl")
    heldout = report["scores"]["heldout_prompts"]  # one prompt in five, left out of generation and training
    assert 150 <= heldout <= 250 and len(scored) == 1000 - heldout and all(len(r["responses"]) == 4 for r in scored)
    assert sum(map(sum, (r["scores"] for r in scored))) / (4 * len(scored)) >= 0.5
    held = report["scores"]["heldout"]  # every model scored on them: the source teaches, the target learns
    assert held["source"] >= 0.9 and held["target_before"] <= 0.05 and held["pack"] >= 0.9, held
    assert report["scores"]["eval"]["pack"] >= 0.9 and report["warning"] is None

    assert score(grafting.target, grafting.test) <= 0.05  # the target could not do it
    assert score(grafting.source, grafting.test) >= 0.9
    scores = {r["policy"]: r["score"] for r in report["added"]["scores"] if r["task"] == TASK}
    assert scores["subset"] >= 0.9 and scores["base"] <= 0.05  # its pack can, in the registry
    assert "ties" not in scores  # --merged-policy none: no merge scored as a policy of its own

    manifest = json.loads((tmp_path / "rot" / "skillpack.json").read_text())
    provenance = manifest["graft"]
    assert provenance["source"] == {"id": "source", "revision": None, "architecture": "GPT2LMHeadModel"}
    assert provenance["target"]["architecture"] == "LlamaForCausalLM"
    records = [json.loads(line) for line in grafting.prompts.read_text().splitlines()]
    assert provenance["prompts_sha256"] == hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    assert provenance["generation"] == {"samples": 4, "temperature": 1.5, "top_p": 1.0, "max_new_tokens": 8,
                                        "batch_size": 16, "seed": 0}
    assert provenance["scorer"] == {"name": "exact"} and provenance["pairs"] == "paper"
    assert provenance["sft"]["learning_rate"] == 5e-4 and provenance["sft"]["epochs"] == 8
    assert provenance["dpo"]["loss"] == "length-normalised" and provenance["dpo"]["beta"] == 10.0
    assert manifest["quantizer"]["method"] == "gptq"  # calibrated on the generated data by default
    listed = json.loads(run("list", "--json", registry=registry).stdout)
    assert [p["task"] for p in listed] == [TASK]


def test_sft_only_and_the_pack_keeps_the_fine_tune(grafting: Grafting, tmp_path: Path) -> None:
    from skillhub.activation import apply_packs

    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.prompts, "-o", tmp_path / "rot",
                 *LEARN, "--pairs", "none", "--keep", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dpo_skipped"] == "--pairs none" and "dpo" not in report["ran"] and report["pairs"] == 0
    work = tmp_path / "rot.graft"
    assert (work / "sft" / "config.json").is_file() and not (work / "dpo").exists()  # --keep kept it
    assert json.loads((tmp_path / "rot" / "skillpack.json").read_text())["graft"]["dpo"] is None
    tuned = score(work / "sft", grafting.test)
    applied = score(apply_packs(grafting.target, [tmp_path / "rot"], tmp_path / "applied"), grafting.test)
    assert tuned >= 0.9 and applied >= 0.95 * tuned


def test_source_vs_target_pairs_reject_the_targets_own_answers(grafting: Grafting, tmp_path: Path) -> None:
    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.few, "-o", tmp_path / "rot",
                 *QUICK, "--min-score", "1", "--pairs", "source-vs-target", "--dpo-loss", "sigmoid", "--keep", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pairs = lines_of(tmp_path / "rot.graft" / "pairs.jsonl")
    answers = {r["prompt"]: r["answer"] for r in lines_of(grafting.few)}
    assert report["pairs"] == len(pairs) > 0 and "dpo" in report["ran"]
    assert all(p["chosen"] == answers[p["prompt"]] != p["rejected"] for p in pairs)
    # The rejected side is what the SFT model itself answers, greedily.
    from skillhub.graft.generation import GenerationSettings, generate_responses
    from skillhub.io.checkpoint import Checkpoint

    some = pairs[:8]
    own = generate_responses(Checkpoint(tmp_path / "rot.graft" / "sft"), [p["prompt"] for p in some],
                             GenerationSettings(samples=1, temperature=0.0, max_new_tokens=8))
    assert [o[0] for o in own] == [p["rejected"] for p in some]
    provenance = json.loads((tmp_path / "rot" / "skillpack.json").read_text())["graft"]
    assert provenance["pairs"] == "source-vs-target" and provenance["dpo"]["loss"] == "sigmoid"
    assert provenance["dpo"]["beta"] == 0.1


def test_paper_pairs_are_best_against_worst(grafting: Grafting, tmp_path: Path) -> None:
    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.few, "-o", tmp_path / "rot",
                 *QUICK, "--temperature", "1.5", "--stop-after", "pairs", "--json")
    assert result.exit_code == 0, result.output
    scored = {r["prompt"]: r for r in lines_of(tmp_path / "rot.graft" / "scores.jsonl")}
    pairs = lines_of(tmp_path / "rot.graft" / "pairs.jsonl")
    expected = sum(1 for r in scored.values() if max(r["scores"]) > min(r["scores"]))
    assert len(pairs) == expected > 0
    for pair in pairs:
        record = scored[pair["prompt"]]
        by_text = dict(zip(record["responses"], record["scores"]))
        assert by_text[pair["chosen"]] == max(record["scores"]) > by_text[pair["rejected"]] == min(record["scores"])


RULE = '''
def rot13_ok(prompt, response, answer):
    word = prompt.removeprefix("rot ").removesuffix("=")
    return response == "".join(chr((ord(c) - 97 + 13) % 26 + 97) for c in word)
'''


def test_rule_scorer_needs_no_answers(grafting: Grafting, tmp_path: Path) -> None:
    bare = write_jsonl([{"prompt": r["prompt"]} for r in lines_of(grafting.few)], tmp_path / "bare.jsonl")
    (tmp_path / "rules.py").write_text(RULE)
    result = run("graft", grafting.source, grafting.target, "--prompts", bare, "-o", tmp_path / "rot", *QUICK,
                 "--temperature", "1.5", "--scorer", f"rule:{tmp_path / 'rules.py'}:rot13_ok", "--stop-after", "score")
    assert result.exit_code == 0, result.output
    by_rule = lines_of(tmp_path / "rot.graft" / "scores.jsonl")
    answers = {r["prompt"]: r["answer"] for r in lines_of(grafting.few)}
    for record in by_rule:  # the rule agrees with exact match against the answers it never saw
        assert record["scores"] == [float(r == answers[record["prompt"]]) for r in record["responses"]]
    assert 0 < sum(map(sum, (r["scores"] for r in by_rule))) < 4 * len(by_rule)

    # exact needs answers, and says so
    result = run("graft", grafting.source, grafting.target, "--prompts", bare, "-o", tmp_path / "other", *QUICK)
    assert result.exit_code == 1 and "needs an \"answer\" on every line" in result.output


def _reward_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_reward_scorer_scores_with_the_reward_models_logit(grafting: Grafting, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    reward = _reward_model(tmp_path / "reward")
    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.few, "-o", tmp_path / "rot", *QUICK,
                 "--samples", "2", "--scorer", f"reward:{reward}", "--stop-after", "score")
    assert result.exit_code == 0, result.output
    record = lines_of(tmp_path / "rot.graft" / "scores.jsonl")[3]
    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    tokenizer = build_tokenizer()
    with torch.no_grad():
        for response, got in zip(record["responses"], record["scores"]):
            ids = tokenizer(record["prompt"] + response, return_tensors="pt")
            assert got == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-4)


def test_a_killed_graft_resumes_from_its_last_finished_stage(grafting: Grafting, tmp_path: Path) -> None:
    def arguments(sft_steps: int) -> list[str]:
        return ["graft", str(grafting.source), str(grafting.target), "--prompts", str(grafting.few), "-o",
                str(tmp_path / "rot"), *QUICK, "--sft-steps", str(sft_steps), "--keep", "--json"]

    args = arguments(400)
    work = tmp_path / "rot.graft"
    process = subprocess.Popen([sys.executable, "-m", "skillhub", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 240
    while not (work / "scores.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the fine-tuning
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert (work / "generations.jsonl").is_file() and not (work / "sft" / "config.json").exists()
    generated = (work / "generations.jsonl").read_bytes()

    result = run(*arguments(5))
    assert result.exit_code != 0 and "holds another graft (it differs in sft)" in result.output  # not mixed

    result = run(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reused"] == ["generate", "score"] and report["ran"] == ["sft", "pairs", "dpo", "pack", "check"]
    assert (work / "generations.jsonl").read_bytes() == generated


def test_stop_after_then_resume(grafting: Grafting, tmp_path: Path) -> None:
    common = ["graft", grafting.source, grafting.target, "--prompts", grafting.few, "-o", tmp_path / "rot", *QUICK]
    first = run(*common, "--stop-after", "sft", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["ran"] == ["generate", "score", "sft"] and not (tmp_path / "rot").exists()
    second = run(*common, "--json")
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert report["reused"] == ["generate", "score", "sft"] and report["ran"][-2:] == ["pack", "check"]
    assert (tmp_path / "rot" / "skillpack.json").is_file()


def _assert_refused(result, registry: Path, output: Path, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message and "Traceback" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert not output.exists()
    if (registry / "registry.db").exists():
        assert json.loads(run("list", "--json", registry=registry).stdout) == []


def test_bad_input_is_refused_with_one_line_and_nothing_registered(grafting: Grafting, tmp_path: Path) -> None:
    registry, output = tmp_path / "registry", tmp_path / "rot"

    def graft(source: Path, *extra: object, prompts: Path = grafting.few):
        return run("graft", source, grafting.target, "--prompts", prompts, "-o", output, *QUICK, "--add", *extra,
                   registry=registry)

    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "   ", "answer": "x"}\n\n{"prompt": ""}\n')
    _assert_refused(graft(grafting.source, prompts=blank), registry, output, "has no usable lines")

    _assert_refused(graft(grafting.source, "--scorer", f"reward:{grafting.target}"), registry, output,
                    "is not a sequence-classification model")

    mute = shutil.copytree(grafting.source, tmp_path / "mute")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mute / name).unlink(missing_ok=True)
    _assert_refused(graft(mute), registry, output, "has no usable tokenizer")

    _assert_refused(graft(grafting.source, "--scorer", "nonesuch"), registry, output, "unknown scorer 'nonesuch'")

    # a registry of another base: refused before any work
    other = tmp_path / "other-base"
    build_tiny_model(other, seed=7)
    from skillhub import create_pack

    tuned = shutil.copytree(other, tmp_path / "other-tuned")
    weights = load_file(tuned / "model.safetensors")
    weights["model.norm.weight"] += 0.5
    from safetensors.torch import save_file
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert run("add", create_pack(other, tuned, tmp_path / "other-pack", task="other").path, "--task", "other",
               "--no-eval", registry=registry).exit_code == 0
    result = graft(grafting.source)
    assert result.exit_code == 1 and "differs from the registered base" in result.output, result.output
    assert not output.exists() and not (tmp_path / "rot.graft").exists()
    assert [p["task"] for p in json.loads(run("list", "--json", registry=registry).stdout)] == ["other"]


def test_a_work_directory_of_something_else_is_refused(grafting: Grafting, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("the user's")
    result = run("graft", grafting.source, grafting.target, "--prompts", grafting.few, "-o", tmp_path / "rot",
                 *QUICK, "--work-dir", foreign)
    assert result.exit_code == 1 and "is not a graft's" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_unlearning_a_grafted_fix_restores_the_base_bit_for_bit(grafting: Grafting, tmp_path: Path) -> None:
    """Paper App. C.2: graft a "fixed" model (here: one edited to answer some prompts another way)
    into the target, add it, and remove it: the target comes back exactly."""
    edits = [{"prompt": e["prompt"], "answer": e["answer"][::-1]} for e in split_examples("copy", train=60, test=1)[0]]
    fixed = finetune(grafting.target, edits, tmp_path / "fixed", steps=60, learning_rate=1e-3)
    registry = tmp_path / "registry"
    result = run("graft", fixed, grafting.target, "--prompts", write_jsonl(edits, tmp_path / "edits.jsonl"),
                 "-o", tmp_path / "fix", "--task", "fix", *QUICK, "--pairs", "none", "--add", "--json",
                 registry=registry)
    assert result.exit_code == 0, result.output
    pack_id = json.loads(result.stdout)["added"]["id"]
    base = load_file(grafting.target / "model.safetensors")
    assert run("activate", "--task", "fix", "-o", tmp_path / "fixed-on", registry=registry).exit_code == 0
    on = load_file(tmp_path / "fixed-on" / "model.safetensors")
    assert any(not torch.equal(on[k], base[k]) for k in base)  # the fix is in
    assert run("remove", pack_id, registry=registry).exit_code == 0
    off = run("activate", "--task", "fix", "-o", tmp_path / "fixed-off", registry=registry)
    assert off.exit_code == 0, off.output
    off = load_file(tmp_path / "fixed-off" / "model.safetensors")
    assert off.keys() == base.keys() and all(torch.equal(off[k], base[k]) for k in base)


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>{{ m['content'] }}|{% else %}"
                 "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}")


def test_models_with_a_chat_template_read_it(grafting: Grafting, tmp_path: Path) -> None:
    """A source's prompts and a target's training records go through their chat templates, tokenized
    once: the record is the rendered prompt's ids followed by the response's ids and its end."""
    from skillhub.graft.training import dpo_records, sft_records
    from skillhub.scoring.prompts import Renderer

    plain, chat = Renderer(build_tokenizer()), Renderer(build_tokenizer())
    chat.tokenizer.chat_template = CHAT_TEMPLATE
    chat = Renderer(chat.tokenizer)
    assert plain.tokenizer.decode(plain.prompt_ids("rot abc=")) == "<s>rot abc="
    assert chat.tokenizer.decode(chat.prompt_ids("rot abc=")) == "<s>rot abc=|"
    [record] = sft_records(chat, [{"prompt": "p", "completion": "c"}], max_length=64)
    assert chat.tokenizer.decode(record["input_ids"]) == "<s>p|c</s>"
    assert record["labels"][:3] == [-100] * 3 and chat.tokenizer.decode(record["labels"][3:]) == "c</s>"
    [pair] = dpo_records(chat, [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert [chat.tokenizer.decode(pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == ["<s>p|", "c</s>",
                                                                                                       "r</s>"]

    target = shutil.copytree(grafting.target, tmp_path / "chat-target")
    chat.tokenizer.save_pretrained(target)  # the target's tokenizer, with its chat template
    result = run("graft", grafting.source, target, "--prompts", grafting.few, "-o", tmp_path / "rot", *QUICK,
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ran"][-2:] == ["pack", "check"]
