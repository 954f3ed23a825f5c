"""OpenAI's API shapes: request bodies checked into :class:`~skillhub.serving.engine.Request`, and
the JSON of completions, stream chunks, model lists and errors.

Bodies are checked by pydantic. Fields of OpenAI's API that would change the answer and that
skillhub does not implement (``n`` > 1, ``logprobs``, tools, penalties, ``echo``...) are refused
with a 400 naming the field rather than ignored; fields that change nothing (``user``...) are
accepted. skillhub's own extras, as LoRAX's ``merged_adapters``: ``packs`` (pack ids that answer
instead of the model's set) and ``merge`` (how they are combined: the settings of
:class:`~skillhub.activation.Merge`, ``lambda`` for its scale).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from skillhub.activation import MERGE_METHODS, Merge
from skillhub.errors import SkillhubError
from skillhub.serving.engine import Request, Sampling

# Fields of OpenAI's API that change the answer and that skillhub does not implement, with the
# value that means "not used" (a request may send that value).
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "response_format": None}


class BadRequest(Exception):
    """A request skillhub refuses: its HTTP status, message, OpenAI error type and parameter."""

    def __init__(self, status: int, message: str, *, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, *, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON (the ``openai`` client raises the matching exception class from the status)."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal[MERGE_METHODS] = "sum"  # type: ignore[valid-type]
    weights: list[float] | None = None
    density: float = 0.5
    scale: float = Field(1.0, alias="lambda")
    seed: int = 0


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    packs: list[str] | None = Field(None, min_length=1, max_length=64)
    merge: MergeBody | Literal[MERGE_METHODS] | None = None  # type: ignore[valid-type]

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or not all(0 < len(s) <= 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_text(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of several is not supported)")
            return value[0]
        return value


def parse_request(document: Any, *, chat: bool, max_tokens: int) -> tuple[Request, bool, bool]:
    """The engine's request from a JSON body, with ``stream`` and ``stream_options.include_usage``.

    Raises:
        BadRequest: The body is not a valid request (400, naming the parameter).
    """
    if not isinstance(document, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    try:
        body: ChatBody | CompletionBody = (ChatBody if chat else CompletionBody).model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise BadRequest(400, f"{where}: {error['msg']}", param=where) from None
    for name, unused in UNSUPPORTED.items():
        value = document.get(name, unused)
        if value is not None and value != unused and not (name == "response_format" and value == {"type": "text"}):
            raise BadRequest(400, f"{name} is not supported by skillhub serve (send {unused!r} or leave it out)",
                             param=name)
    asked = (body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens)
    asked = max_tokens if asked is None else asked
    if not 1 <= asked <= max_tokens:
        raise BadRequest(400, f"max_tokens must be between 1 and this server's limit of {max_tokens}, not {asked}",
                         param="max_tokens")
    try:
        if body.merge is None or isinstance(body.merge, str):  # a method's name alone takes its defaults
            merge = Merge(body.merge) if body.merge else None
        else:
            weights = tuple(body.merge.weights) if body.merge.weights is not None else None
            merge = Merge(body.merge.method, weights, body.merge.density, body.merge.scale, body.merge.seed)
    except SkillhubError as exc:
        raise BadRequest(400, f"merge: {exc}", param="merge") from None
    request = Request(model=body.model, max_tokens=asked,
                      messages=tuple(m.as_text() for m in body.messages) if chat else None,
                      prompt=None if chat else body.prompt,
                      sampling=Sampling(body.temperature, body.top_p, body.seed), stop=tuple(body.stop or ()),
                      packs=tuple(body.packs) if body.packs is not None else None, merge=merge)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return request, body.stream, include_usage


# ---------------------------------------------------------------------- responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def routing_info(decided) -> dict[str, Any]:
    """Which packs answered, in every response body (``skillhub``) and header (``X-Skillhub-*``)."""
    decision = decided.decision
    return {"task": decision.task, "packs": list(decision.packs), "probability": decision.probability,
            "abstained": decision.abstained}


def routing_headers(decided) -> dict[str, str]:
    info = routing_info(decided)
    headers = {"X-Skillhub-Packs": ",".join(info["packs"]), "X-Skillhub-Task": info["task"] or ""}
    if info["probability"] is not None:
        headers["X-Skillhub-Probability"] = f"{info['probability']:.6f}"
    return headers


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(*, chat: bool, id_: str, model: str, text: str, reason: str, decided, completion_tokens: int,
               created: int | None = None) -> dict[str, Any]:
    """A whole ``chat.completion`` or ``text_completion`` object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": id_, "object": "chat.completion" if chat else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": [choice],
            "usage": usage(decided.prompt_tokens, completion_tokens), "skillhub": routing_info(decided)}


def chunk(*, chat: bool, id_: str, model: str, created: int, text: str | None = None, reason: str | None = None,
          first: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent ``chat.completion.chunk`` (or ``text_completion``) of a stream."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    body = {"id": id_, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
    return {**body, **(extra or {})}
