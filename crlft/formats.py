"""Source files and their four record layouts: ``read_source`` (file → records) and ``FORMATS`` (record → conversation).

Each format is one small pure function; the record rules (system and condition keys, roles, weights) are in
``docs/design.md`` ("Prepared data").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import datasets

from crlft.config import SourceConfig
from crlft.conversation import Conversation, Message
from crlft.errors import UserError
from crlft.jsonl import JsonLineError, read_jsonl

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class RecordError(ValueError):
    """A record that cannot become a conversation; the caller adds the file and record number."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {_short(value)}")
    return value


def _weight(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RecordError(f"{what} must be a non-negative number, got {_short(value)}")
    return float(value)


def _turns(record: dict[str, Any], key: str, fmt: str) -> list:
    value = record.get(key)
    if value is None:
        present = ", ".join(k for k, v in record.items() if v is not None) or "none"
        raise RecordError(f"has no {key!r} (the {fmt} format needs it; keys present: {present})")
    if not isinstance(value, list):
        raise RecordError(f"{key!r} must be a list of messages, got {_short(value)}")
    return value


def _finish(record: dict[str, Any], messages: list[Message], system_parts: list[str]) -> Conversation:
    """Add the record-level ``system`` and ``condition`` keys every format may carry."""
    system = record.get("system")
    if system is not None:
        system_parts.insert(0, _text(system, "system"))
    condition = record.get("condition")
    condition = "" if condition is None else _text(condition, "condition")
    return Conversation(messages, "\n\n".join(p for p in system_parts if p), condition)


def _message_list(
    turns: list, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> tuple[list[Message], list[str]]:
    """Messages and system texts of a list of turns; ``roles`` maps the source's role names to ours.

    Runs once per record in the map workers, so the common case takes a fast path; anything unusual goes to
    ``_turn_problem`` for a precise message.
    """
    messages: list[Message] = []
    system_parts: list[str] = []
    for turn in turns:
        try:
            role = roles[turn[role_key]]
            content = turn[content_key]
            weight = turn.get("weight")
        except (KeyError, TypeError, AttributeError):
            raise _turn_problem(turns, key, role_key, content_key, roles) from None
        if content.__class__ is not str:
            raise _turn_problem(turns, key, role_key, content_key, roles)
        if weight is not None and not (weight.__class__ is float and 0.0 <= weight < math.inf):
            if weight.__class__ is int and weight >= 0:
                weight = float(weight)  # a JSON integer such as 0 or 1
            else:
                raise _turn_problem(turns, key, role_key, content_key, roles)
        if role == "system":
            system_parts.append(content)
        else:
            messages.append(Message(role, content, weight))
    return messages, system_parts


def _turn_problem(turns: list, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> RecordError:
    """The precise error for the first bad turn (the slow path of ``_message_list``)."""
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return RecordError(f"{key}[{i}] must be an object, got {_short(turn)}")
        role_name = turn.get(role_key)
        if not isinstance(role_name, str) or role_name not in roles:
            known = ", ".join(repr(r) for r in roles)
            return RecordError(f"{key}[{i}]: unknown role {role_name!r} in {role_key!r} (known: {known})")
        try:
            _text(turn.get(content_key), f"{key}[{i}].{content_key}")
            _weight(turn.get("weight"), f"{key}[{i}].weight")
        except RecordError as e:
            return e
    raise AssertionError("_turn_problem called for valid turns")


OPENCHAT_ROLES = {"user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGES_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def openchat_record(record: dict[str, Any]) -> Conversation:
    """OpenChat's own layout: ``items[{role: user|assistant, content, weight?}]``, ``condition?``, ``system?``."""
    messages, system_parts = _message_list(_turns(record, "items", "openchat"), "items", "role", "content",
                                           OPENCHAT_ROLES)
    return _finish(record, messages, system_parts)


def sharegpt_record(record: dict[str, Any]) -> Conversation:
    """ShareGPT: ``conversations[{from: human|gpt|system, value, weight?}]``; ``system`` turns become system text."""
    messages, system_parts = _message_list(_turns(record, "conversations", "sharegpt"), "conversations", "from",
                                           "value", SHAREGPT_ROLES)
    return _finish(record, messages, system_parts)


def messages_record(record: dict[str, Any]) -> Conversation:
    """OpenAI style: ``messages[{role: system|user|assistant, content, weight?}]``."""
    messages, system_parts = _message_list(_turns(record, "messages", "messages"), "messages", "role", "content",
                                           MESSAGES_ROLES)
    return _finish(record, messages, system_parts)


def alpaca_record(record: dict[str, Any]) -> Conversation:
    """Alpaca: ``instruction``, optional ``input`` (appended after a blank line) and ``output``."""
    instruction = _text(record.get("instruction"), "instruction")
    extra = record.get("input")
    prompt = f"{instruction}\n\n{_text(extra, 'input')}" if extra else instruction
    messages = [Message("user", prompt), Message("assistant", _text(record.get("output"), "output"))]
    return _finish(record, messages, [])


FORMATS: dict[str, Callable[[dict[str, Any]], Conversation]] = {
    "openchat": openchat_record,
    "sharegpt": sharegpt_record,
    "messages": messages_record,
    "alpaca": alpaca_record,
}


def reward_to_weight(reward: float, mode: str, beta: float = 1.0) -> float:
    """The loss weight of a source's assistant tokens.

    Args:
        reward: The source's coarse reward (≥ 0).
        mode: ``linear`` (weight = reward, OpenChat's release) or ``exp`` (weight = exp(reward / beta), the
            paper's optimal KL-regularised policy).
        beta: Temperature of ``exp``.

    Returns:
        The weight.
    """
    if mode == "linear":
        return float(reward)
    if mode == "exp":
        return math.exp(reward / beta)
    raise ValueError(f"unknown reward_to_weight {mode!r}; one of 'linear', 'exp'")


def is_local_path(path: str) -> bool:
    """A path names a local file when it exists, has a known extension, or is clearly a filesystem path."""
    return (os.path.exists(path) or os.path.splitext(path)[1].lower() in LOCAL_EXTENSIONS
            or path.startswith((".", "/", "~")))


def read_source(source: SourceConfig, cache_dir: str | None = None, where: str = ""):
    """Read a source's records as a ``datasets.Dataset`` (one row per record, in file order).

    Args:
        source: The source (its ``path``, and ``split`` for hub datasets).
        cache_dir: Where ``datasets`` may write its Arrow cache (prepare uses a temporary directory).
        where: The recipe location of the source's ``path``, for error messages.

    Returns:
        The records.

    Raises:
        UserError: A missing file, an unsupported extension, malformed JSON (with file and line), or a hub
            dataset that cannot be loaded.
    """
    path = os.path.expanduser(source.path)
    at = f" ({where})" if where else ""
    if not is_local_path(path):
        try:
            return datasets.load_dataset(path, split=source.split, cache_dir=cache_dir)
        except Exception as e:  # the hub client raises many types (offline, not found, gated)
            raise UserError(f"source {source.name!r}: {path!r} is no local file and the hub dataset could not be "
                            f"loaded{at}: {type(e).__name__}: {e}") from None
    if not os.path.isfile(path):
        raise UserError(f"source {source.name!r}: file not found: {path}{at}")
    builder = LOCAL_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise UserError(f"source {source.name!r}: {path}: unsupported file type; use "
                        f"{', '.join(LOCAL_EXTENSIONS)}{at}")
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # pyarrow and datasets raise several types; locate the problem ourselves
        problem = _locate_json_problem(path) if builder == "json" else None
        cause = e.__cause__ or e
        raise UserError(problem or f"{path}: could not be read: {type(cause).__name__}: {cause}") from None


def _locate_json_problem(path: str) -> str | None:
    """``file:line: ...`` for the first malformed JSON record, or None when every record parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):  # one JSON list
        with open(path, encoding="utf-8", errors="replace") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}"
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                return f"{path} (record {i}): a record must be a JSON object, got {_short(record)}"
        return None
    try:
        for line_number, record in read_jsonl(path, errors="replace"):
            if not isinstance(record, dict):
                return f"{path}:{line_number}: a record must be a JSON object, got {_short(record)}"
    except JsonLineError as e:
        return str(e)
    return None
