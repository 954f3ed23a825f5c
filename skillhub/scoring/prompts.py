"""One rule for every token sequence skillhub feeds a model: how a prompt is rendered, how an
answer is appended to it, and where a generated answer ends.

A prompt is rendered in one of two formats:

- ``chat``: the tokenizer's chat template, with one user turn (after an optional system turn) and
  the generation prompt added. The template's own default system prompt stays where the template
  renders one (SmolLM2's does). The rendered text is tokenized with ``add_special_tokens=False``:
  the template writes the special tokens it wants (Gemma's ``<bos>``) itself, as transformers'
  ``apply_chat_template(tokenize=True)`` does.
- ``plain``: ``<bos>`` (when the tokenizer has one) followed by the prompt's tokens.

The default is ``chat`` when the tokenizer has a chat template, else ``plain``.

Answers are joined as tokens, never as text: ``prompt_ids(p) + answer_ids(a)``, where
``answer_ids`` is the answer tokenized alone, followed by the token that ends an answer. So
training, teacher-forced scoring and generation all see one sequence, whatever the tokenizer
does at a text boundary (a word-level tokenizer would read ``=`` + ``6`` as one unknown word).

The end of an answer is the chat template's end-of-turn token (``<|im_end|>``, ``<end_of_turn>``,
``<|eot_id|>``: the first special token the template writes after an assistant message), which
is not necessarily ``eos_token``; in the plain format it is ``eos_token``. Generation stops at
either. A missing pad token is replaced by the end token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skillhub.errors import SkillhubError

FORMATS = ("chat", "plain")
_PROBE = "skillhub-answer-probe"  # an assistant message whose end the template is asked to render


@dataclass(frozen=True)
class PromptFormat:
    """How a task's (or a router's, or a graft's) prompts are rendered: ``kind`` is ``chat``,
    ``plain`` or None (the tokenizer's default); ``system`` is a system turn (chat only)."""

    kind: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in FORMATS:
            raise SkillhubError(f"unknown prompt format {self.kind!r}: use one of {', '.join(FORMATS)}")
        if self.system is not None and self.kind == "plain":
            raise SkillhubError("--system needs the chat format: a plain prompt has no system turn")

    def as_json(self) -> dict[str, Any]:
        return {"format": self.kind, "system": self.system}

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> PromptFormat:
        document = document or {}
        return cls(kind=document.get("format"), system=document.get("system"))

    def describe(self) -> str:
        """``chat``, ``plain``, ``default``, with the system prompt when there is one."""
        shown = self.kind or "default"
        return shown if self.system is None else f"{shown}, system: {self.system}"


def normalize_answer(text: str) -> str:
    """An answer compared as text: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


class Renderer:
    """A prompt format bound to one tokenizer: token ids of prompts, answers and documents.

    Raises:
        SkillhubError: ``chat`` is asked of a tokenizer without a chat template, or the tokenizer
            has neither an end-of-turn nor an end-of-sequence token to end an answer with.
    """

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat = PromptFormat(), *,
                 what: str = "the model") -> None:
        template = getattr(tokenizer, "chat_template", None)
        kind = prompt_format.kind or ("chat" if template else "plain")
        if kind == "chat" and not template:
            raise SkillhubError(f"{what}'s tokenizer has no chat template, so --format chat cannot render its "
                                "prompts: use --format plain, or save a tokenizer with a chat template")
        if prompt_format.system is not None and kind != "chat":
            raise SkillhubError(f"--system needs the chat format, and {what}'s tokenizer has no chat template")
        self.tokenizer, self.kind, self.system = tokenizer, kind, prompt_format.system
        self.format = PromptFormat(kind, prompt_format.system)
        eos = tokenizer.eos_token_id
        self.end_id = self._end_of_turn() if kind == "chat" else None
        if self.end_id is None:
            self.end_id = eos
        if self.end_id is None:
            raise SkillhubError(f"{what}'s tokenizer has no end-of-turn or end-of-sequence token: an answer "
                                "could never end; save the tokenizer with an eos_token")
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.end_id, eos) if i is not None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id
        bos = tokenizer.bos_token_id
        self._bos = [bos] if bos is not None else []

    # ------------------------------------------------------------------ sequences

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*system, {"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the model reads it before answering."""
        if self.kind == "plain":
            return self._bos + self.tokenizer.encode(prompt, add_special_tokens=False)
        text = self.tokenizer.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def conversation_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """A conversation (``role``/``content`` messages, OpenAI's shape) as the model reads it before
        the assistant's next turn: the chat template with the generation prompt, the format's system
        turn first when the conversation has none. The plain format renders only one user message
        (as :meth:`prompt_ids`): it has no turns.

        Raises:
            SkillhubError: The conversation cannot be rendered in this format (the message says why).
        """
        if self.kind == "plain":
            if len(messages) != 1 or messages[0].get("role") != "user":
                raise SkillhubError("the base's tokenizer has no chat template, so only a single user message "
                                    "can be rendered (as a plain prompt): send one user message")
            return self.prompt_ids(messages[0]["content"])
        has_system = any(m.get("role") == "system" for m in messages)
        system = [{"role": "system", "content": self.system}] if self.system is not None and not has_system else []
        try:
            text = self.tokenizer.apply_chat_template([*system, *messages], add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes (jinja's TemplateError mostly)
            raise SkillhubError(f"the chat template cannot render this conversation: {exc}") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's own tokens, then the token that ends it."""
        return [*self.tokenizer.encode(answer, add_special_tokens=False), self.end_id]

    def example(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of prompt + answer, the prompt masked out of the labels with -100."""
        prompt_ids, answer_ids = self.prompt_ids(prompt), self.answer_ids(answer)
        return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids

    def document_ids(self, text: str) -> list[int]:
        """A document (perplexity text, calibration text): ``<bos> text <eos>``, in any format; a
        document is not a prompt, so no template turns are put around it."""
        eos = self.tokenizer.eos_token_id
        return self._bos + self.tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])

    # ------------------------------------------------------------------ answers

    def answer_of(self, generated: list[int]) -> list[int]:
        """Generated ids up to (not including) the first token that ends an answer."""
        for position, token in enumerate(generated):
            if token in self.stop_ids:
                return list(generated[:position])
        return list(generated)

    def decode(self, generated: list[int]) -> str:
        """The text of a generated answer (cut at its end, special tokens dropped)."""
        return self.tokenizer.decode(self.answer_of(generated), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ the template's end of turn

    def _end_of_turn(self) -> int | None:
        """The first special token the chat template writes after an assistant message's content
        (None when it writes none, or cannot render an assistant turn)."""
        messages = [*self._messages("skillhub"), {"role": "assistant", "content": _PROBE}]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may refuse this conversation; eos then ends answers
            return None
        at = text.rfind(_PROBE)
        if at < 0:
            return None
        special = set(self.tokenizer.all_special_ids) | {
            i for i, token in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if token.special}
        for token in self.tokenizer.encode(text[at + len(_PROBE):], add_special_tokens=False):
            if token in special:
                return token
        return None


def as_renderer(renderer_or_tokenizer: Any) -> Renderer:
    """A Renderer as given, or a tokenizer bound to its default format (for callers that score a
    model the way it reads prompts by default)."""
    if isinstance(renderer_or_tokenizer, Renderer):
        return renderer_or_tokenizer
    return Renderer(renderer_or_tokenizer)


def context_length(model: Any) -> int | None:
    """The model's context in tokens, when its config says."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(text, "max_position_embeddings", None)


def check_context(model: Any, ids: list[int], prompt: str, *, room: int = 0) -> None:
    """Raises SkillhubError when the prompt (plus ``room`` new tokens) exceeds the model's context."""
    context = context_length(model)
    if context is not None and len(ids) + room > context:
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        extra = f" plus {room} new tokens" if room else ""
        raise SkillhubError(f"prompt {shown!r} is {len(ids)} tokens{extra} as rendered, more than the model's "
                            f"context of {context}: shorten it" + (" or lower --max-new-tokens" if room else ""))
