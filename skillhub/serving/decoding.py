"""One batch of a server's answers while they are generated: each row's tokens, the text it may send
so far, and when it is done.

transformers' ``generate`` runs the batch. :class:`BatchStreams` is the streamer it hands every
step's tokens to (one per row) and the stopping criterion it asks which rows are done: a row ends
at the prompt format's end token (as :func:`skillhub.scoring.generation.generate_answers` ends it),
at its own ``max_tokens`` (rows of one batch may ask for different lengths), at one of its stop
strings, or when its client went away or its time ran out. The other rows are unaffected: a done
row is padded, as ``generate`` pads rows that met their end token.

Text is sent only once it is final: a stop string may still complete, the answer's trailing
whitespace may still be followed by more text, and a token may end inside a UTF-8 character. So
the streamed pieces join to exactly the text of the non-streamed answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from skillhub.scoring.prompts import Renderer

STOP = "stop"  # the answer ended (end token or stop string): OpenAI's finish_reason
LENGTH = "length"  # max_tokens reached
CANCELLED = "cancelled"  # the client went away
TIMEOUT = "timeout"  # the request's time ran out


@dataclass
class Row:
    """One answer being generated.

    Args:
        renderer: The prompt format (its end tokens, the tokenizer that decodes).
        max_tokens: Most tokens this row may generate.
        stop: Stop strings: the answer ends before the first one (which is not sent).
        strip: Strip the answer's surrounding whitespace (a chat message, as ``skillhub generate``
            prints it), or keep it (a plain completion continues its prompt's text).
        on_text: Called with each newly final piece of text.
        gone: Whether the client went away (checked at every step).
        deadline: ``time.monotonic()`` after which the row ends.
    """

    renderer: Renderer
    max_tokens: int
    stop: Sequence[str] = ()
    strip: bool = True
    on_text: Callable[[str], None] = lambda text: None
    gone: Callable[[], bool] = lambda: False
    deadline: float = float("inf")
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    decoded: str = ""  # the tokens' text, decoded once per token
    sent: int = 0  # characters of text() already handed to on_text

    def take(self, token: int) -> None:
        """One generated token (ignored once the row is done)."""
        if self.finish is not None:
            return
        if token in self.renderer.stop_ids:
            self.finish = STOP
        else:
            self.tokens.append(token)
            self.decoded = self.renderer.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if self._stop_at() is not None:
                self.finish = STOP
            elif len(self.tokens) >= self.max_tokens:
                self.finish = LENGTH
        if self.finish is None:
            if self.gone():
                self.finish = CANCELLED
            elif time.monotonic() > self.deadline:
                self.finish = TIMEOUT
        self._send()

    def text(self) -> str:
        """The answer's text so far, cut before the first stop string (final once the row is done)."""
        at = self._stop_at()
        decoded = self.decoded if at is None else self.decoded[:at]
        return decoded.strip() if self.strip else decoded

    def _stop_at(self) -> int | None:
        found = [at for at in (self.decoded.find(s) for s in self.stop) if at >= 0]
        return min(found) if found else None

    def _send(self) -> None:
        text = self.text()  # stripped already: trailing whitespace waits for what follows it
        if self.finish is None:  # keep back what may still change
            hold = max((len(s) for s in self.stop), default=1) - 1
            text = text[:max(0, len(text) - hold)]
            if text.endswith("\ufffd"):  # a token ended inside a character
                text = text[:-1]
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


class BatchStreams(BaseStreamer, StoppingCriteria):
    """The rows of one batch, as ``generate``'s streamer and stopping criterion."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompts
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            row.take(token)

    def end(self) -> None:
        for row in self.rows:
            if row.finish is None:  # generate stopped at the batch's longest max_tokens
                row.finish = LENGTH
                row._send()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)
