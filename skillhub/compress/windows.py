"""Calibration text as token windows: the file read, each record rendered as the model reads it,
the stream cut into windows of equal length.

A calibration file is JSONL of ``{"text"}`` documents or ``{"prompt", "answer"}`` examples, or
plain text. Documents become ``<bos> text <eos>``; examples are rendered by the tuned model's
prompt format (its chat template's turn when it has one, the answer joined as tokens and ended
by its end-of-turn token: :class:`~skillhub.scoring.prompts.Renderer`), so the activations GPTQ
is calibrated on are those the model sees when it is used. Records are joined into one stream
and cut into consecutive windows, so no window holds padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import CalibrationError
from skillhub.io.jsonio import MAX_TEXT_BYTES, parse_json, read_regular
from skillhub.scoring.prompts import Renderer


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows to run through the model, and where they came from (for the manifest)."""

    input_ids: torch.Tensor  # (samples, seqlen)
    source: dict[str, Any]


def read_calibration_records(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Records of a calibration file: ``{"text"}`` or ``{"prompt", "answer"}`` per JSONL line (an
    answer may be absent: then empty), or the whole of a plain-text file as one ``{"text"}``.

    Raises:
        CalibrationError: The file is missing, empty, or a JSONL line has no usable field.
    """
    path = Path(path)
    what = f"calibration file {path}"
    try:
        content = read_regular(path, what=what, error=CalibrationError, max_bytes=MAX_TEXT_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    lines = [line for line in content.splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"calibration file {path} is empty")
    try:
        first = json.loads(lines[0])  # only to tell JSONL from plain text; every line is checked below
    except RecursionError as exc:
        raise CalibrationError(f"{what} line 1 is nested too deeply to be a calibration record") from exc
    except ValueError:
        first = None
    if not isinstance(first, dict):
        return [{"text": content}]  # plain text: one stream, cut into windows later
    records = []
    for number, line in enumerate(lines, start=1):
        record = parse_json(line, what=f"{what} line {number}", error=CalibrationError)
        record = record if isinstance(record, dict) else {}
        if isinstance(record.get("text"), str) and record["text"]:
            records.append({"text": record["text"]})
        elif isinstance(record.get("prompt"), str) and record["prompt"]:
            records.append({"prompt": record["prompt"], "answer": str(record.get("answer", ""))})
        else:
            raise CalibrationError(f"calibration file {path} line {number} has no usable 'text' or 'prompt' field")
    return records


def build_calibration_set(path: str | os.PathLike[str], tokenizer: Any, *, samples: int, seqlen: int,
                          vocab_size: int | None = None) -> CalibrationSet:
    """Tokenize a calibration file into ``samples`` windows of ``seqlen`` tokens.

    Raises:
        CalibrationError: The file yields fewer than ``samples * seqlen`` tokens, or a token id
            the model's ``vocab_size`` embedding rows do not hold (a tokenizer of another model).
    """
    if samples < 1 or seqlen < 2:
        raise CalibrationError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    stream = _token_stream(path, tokenizer)
    needed = samples * seqlen
    if len(stream) < needed:
        raise CalibrationError(
            f"calibration file {path} yields {len(stream)} tokens but {samples} samples x {seqlen} tokens "
            f"need {needed}: give more text or lower --calib-samples/--calib-seqlen"
        )
    input_ids = torch.tensor(stream[:needed]).reshape(samples, seqlen)
    if vocab_size is not None and int(input_ids.max()) >= vocab_size:
        raise CalibrationError(
            f"the model's tokenizer turns {path} into token id {int(input_ids.max())}, but its embedding has "
            f"{vocab_size} rows (config.json vocab_size): put the tokenizer the model was trained with next to it"
        )
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return CalibrationSet(
        input_ids=input_ids,
        source={"file": Path(path).name, "sha256": digest, "samples": samples, "seqlen": seqlen},
    )


def fit_windows(path: str | os.PathLike[str], tokenizer: Any, *, samples: int, seqlen: int) -> tuple[int, int]:
    """(samples, seqlen) shrunk to what the file holds: fewer windows first, then shorter ones.

    For calibration text skillhub generated itself (a graft's responses), where asking the user
    for more text makes no sense.
    """
    tokens = len(_token_stream(path, tokenizer))
    seqlen = max(2, min(seqlen, tokens))
    return max(1, min(samples, tokens // seqlen)), seqlen


def _token_stream(path: str | os.PathLike[str], tokenizer: Any) -> list[int]:
    renderer = Renderer(tokenizer, what="the tuned model")
    stream: list[int] = []
    for record in read_calibration_records(path):
        if "text" in record:
            stream.extend(renderer.document_ids(record["text"]))
        else:
            stream.extend(renderer.example(record["prompt"], record["answer"])[0])
    return stream
