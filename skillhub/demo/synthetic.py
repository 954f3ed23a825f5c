"""The embedded default: a character tokenizer, tiny Llama models and synthetic tasks.

Nothing here downloads anything. Models are built from a ``transformers`` config with a
fixed seed, so every test and the demo work offline and reproducibly; fine-tuning them
(see :mod:`skillhub.demo.train`) gives genuine deltas.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch

from skillhub.progress import quiet_transformers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 =+-><:|,."


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast (import kept lazy)
    """A character-level fast tokenizer: one token per character, plus pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama_config(*, layers: int = 4, hidden: int = 128, intermediate: int = 384, vocab_size: int = 64):
    """A Llama-architecture config with grouped-query attention and an untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model(output: str | os.PathLike[str], *, seed: int = 0, **config_overrides: int) -> Path:
    """Save a freshly initialised tiny Llama (float32, safetensors) and the character tokenizer.

    Args:
        output: Directory to write.
        seed: Initialisation seed.
        **config_overrides: ``layers``, ``hidden``, ``intermediate`` for :func:`tiny_llama_config`.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=64, **config_overrides))
    output = Path(output)
    with quiet_transformers():
        model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


# The grafting source's tokenizer disagrees with the target's on every id: other special tokens
# (one <|endoftext|> for begin, end and padding, as GPT-2 has) and the characters in reverse order.
SOURCE_SPECIAL_TOKENS = ("<|endoftext|>", "<|unk|>")


def build_source_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """The character tokenizer of the demo's grafting source: same characters, other ids and specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SOURCE_SPECIAL_TOKENS + tuple(reversed(CHARACTERS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>")


def build_tiny_source(output: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Save a freshly initialised tiny GPT-2 (another architecture than the demo's Llama: learned
    positions, fused attention, tied head, GELU MLP) with :func:`build_source_tokenizer`."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = build_source_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    output = Path(output)
    with quiet_transformers():
        model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def _word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def _shift(rng: random.Random) -> dict[str, str]:
    word = _word(rng, 5)
    return {"prompt": f"shift {word}=", "answer": "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)}


def _reverse(rng: random.Random) -> dict[str, str]:
    word = _word(rng, 5)
    return {"prompt": f"rev {word}=", "answer": word[::-1]}


def _sort(rng: random.Random) -> dict[str, str]:
    word = _word(rng, 5)
    return {"prompt": f"sort {word}=", "answer": "".join(sorted(word))}


def _rot(rng: random.Random) -> dict[str, str]:
    """ROT13: each letter moved 13 places (the demo's grafted task: only its source can do it)."""
    word = _word(rng, 5)
    return {"prompt": f"rot {word}=", "answer": "".join(chr((ord(c) - 97 + 13) % 26 + 97) for c in word)}


def _back(rng: random.Random) -> dict[str, str]:
    word = _word(rng, 5)
    return {"prompt": f"back {word}=", "answer": "".join(chr((ord(c) - 97 - 1) % 26 + 97) for c in word)}


def _mirror(rng: random.Random) -> dict[str, str]:
    """No task word: a bare lowercase word maps each letter to its mirror (a<->z, b<->y...)."""
    word = _word(rng, 5)
    return {"prompt": f"{word}=", "answer": "".join(chr(219 - ord(c)) for c in word)}


def _inc(rng: random.Random) -> dict[str, str]:
    """No task word: a bare number has each digit incremented (9 wraps to 0)."""
    digits = "".join(rng.choice("0123456789") for _ in range(5))
    return {"prompt": f"{digits}=", "answer": "".join(str((int(d) + 1) % 10) for d in digits)}


def _copy(rng: random.Random) -> dict[str, str]:
    """What the demo's base model is pretrained on: copy a word or a number."""
    text = _word(rng, 5) if rng.random() < 0.5 else "".join(rng.choice("0123456789") for _ in range(5))
    return {"prompt": f"copy {text}=", "answer": text}


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return {"prompt": f"add {a}+{b}=", "answer": str(a + b)}


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "shift": _shift,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "back": _back,
    "mirror": _mirror,
    "inc": _inc,
    "copy": _copy,
    "rot": _rot,
}


def make_examples(task: str, count: int, *, seed: int) -> list[dict[str, str]]:
    """``count`` distinct prompt/answer pairs of a synthetic task."""
    rng = random.Random(f"{task}:{seed}")
    examples: dict[str, dict[str, str]] = {}
    while len(examples) < count:
        example = TASKS[task](rng)
        examples.setdefault(example["prompt"], example)
    return list(examples.values())


def split_examples(task: str, *, train: int, test: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and test sets of a synthetic task."""
    examples = make_examples(task, train + test, seed=seed)
    return examples[:train], examples[train:]


def write_jsonl(examples: list[dict[str, str]], path: str | os.PathLike[str]) -> Path:
    """Write examples as JSON lines."""
    path = Path(path)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path
