"""Source readers, reward → weight, ``crlft prepare`` (tokenized dataset + report) and ``crlft inspect``.

The way through: each source file is read with ``datasets`` (JSON lines, a JSON list or parquet; a hub name where
a network exists), its records become ``Conversation``s by one small pure function per format (``FORMATS``),
loss weights are resolved (a record's own weights and condition win, the source's reward and condition fill in),
the template renders and tokenizes them in batches in ``num_proc`` processes (``Dataset.map``), rows are truncated
to ``model.max_context``, trailing zero-weight tokens are cut, rows without a supervised token are dropped, and
the result is written with ``save_to_disk``: one row per conversation with ``input_ids`` (int32),
``loss_weights`` (float32, unshifted: ``loss_weights[i]`` weighs predicting ``input_ids[i]``), ``length``,
``source``, ``index`` (record number in its source, 0-based) and ``condition``.

Record rules, the same for every format: a record may carry ``system`` and ``condition`` keys and each message a
``weight`` (OpenChat's format has them; an empty or missing one is filled from the source); ``system`` turns
(ShareGPT ``from: system``, OpenAI ``role: system``) become the system text, joined by a blank line; user
messages always weigh 0 (a non-zero user weight is ignored and counted); trailing user turns are dropped (they
teach nothing) and counted; consecutive turns of the same role are kept as they are (the template renders any
order) and counted; an unknown role, non-string content or a negative / non-numeric weight is an error naming
file, line and record (or, with ``on_error: skip``, a counted skip).

Everything that is left out is counted: per source and condition the report gives conversations read, kept,
truncated, dropped by reason, tokens, supervised tokens and mean weight (``prepare_report.json`` in the output
directory, and a table on stdout).

When a local source file is missing and ``data.generate`` is set, that shell command runs first (the demo writes
its synthetic sources this way).

The output directory also holds ``crlft_meta.json``: everything the rows depend on (template, tokenizer
fingerprint, data settings, ``model.max_context``, the input files' size, mtime and a content hash, the crlft
version). ``prepare`` reuses an output whose metadata matches and regenerates it otherwise; it writes into a
temporary sibling directory and renames it into place, so a crash never leaves a half-written dataset that
looks complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from crlft.config import Recipe, SourceConfig, load_recipe
from crlft.conversation import Conversation, Message
from crlft.errors import UserError

META_FILE = "crlft_meta.json"
REPORT_FILE = "prepare_report.json"

# Bump when the rows prepare writes change for the same inputs, so older outputs are regenerated.
PREPARED_FORMAT_VERSION = 1

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Report keys of the drop reasons, in the order the table shows them.
DROP_REASONS = ("error", "empty", "no_assistant_turn", "zero_weight", "truncated_away")

# Records per map batch: large enough that datasets' per-batch work is amortised.
MAP_BATCH_SIZE = 1000

# Conversations per render_batch call inside a map batch. Measured: the tokenizer needs about 30% less CPU per
# token for a few dozen conversations per call than for a thousand (its per-call working set stays in cache).
RENDER_CHUNK = 16

# How many skipped-record messages the report keeps (the count is always complete).
MAX_ERROR_EXAMPLES = 20

# --------------------------------------------------------------------------------------------------------------
# Records → conversations: one pure function per format
# --------------------------------------------------------------------------------------------------------------


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
    raise UserError(f"unknown reward_to_weight {mode!r}; one of 'linear', 'exp'")


# --------------------------------------------------------------------------------------------------------------
# One batch of records → rows (runs inside the map workers)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SourceJob:
    """What a map worker needs to know about its source (picklable, no tokenizer)."""

    name: str
    path: str
    format: str
    condition: str
    assistant_weight: float
    on_error: str
    template: str
    max_context: int
    per_sequence_loss: bool


# The prepared dataset's columns, and the per-row statistics the report is computed from (not saved).
ROW_COLUMNS = ("input_ids", "loss_weights", "length", "source", "index", "condition")
STAT_COLUMNS = ("_drop", "_truncated", "_trailing_user", "_consecutive", "_user_weight_ignored", "_error",
                "_supervised", "_weight_sum")


def _features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_weights": datasets.List(datasets.Value("float32")),
        "length": datasets.Value("int32"),
        "source": datasets.Value("string"),
        "index": datasets.Value("int64"),
        "condition": datasets.Value("string"),
        "_drop": datasets.Value("string"),
        "_truncated": datasets.Value("bool"),
        "_trailing_user": datasets.Value("int32"),
        "_consecutive": datasets.Value("int32"),
        "_user_weight_ignored": datasets.Value("int32"),
        "_error": datasets.Value("string"),
        "_supervised": datasets.Value("int32"),
        "_weight_sum": datasets.Value("float64"),
    })


def _process_batch(batch: dict[str, list], indices: list[int], job: _SourceJob, tokenizer) -> dict[str, list]:
    """Turn a batch of records into rows: convert, resolve weights, render, truncate, trim, and count.

    Every record gives one row; a dropped record's row has no tokens and its reason in ``_drop`` (the report is
    computed from these columns, then the dropped rows are filtered out).
    """
    from crlft.templates import TEMPLATES, render_batch

    convert = FORMATS[job.format]
    keys = list(batch)
    num_records = len(indices)
    out: dict[str, list] = {name: [] for name in (*ROW_COLUMNS, *STAT_COLUMNS)}
    to_render: list[Conversation] = []
    render_rows: list[int] = []
    for row, (index, values) in enumerate(zip(indices, zip(*(batch[k] for k in keys)))):
        drop, error, trailing_user, consecutive, user_weight_ignored = "", "", 0, 0, 0
        conversation = None
        try:
            conversation = convert(dict(zip(keys, values)))
        except RecordError as e:
            if job.on_error == "raise":
                raise UserError(
                    f"{_record_locations(job.path, [index])[index]}: {e} (set on_error: skip on source "
                    f"{job.name!r} to skip such records and count them)"
                ) from None
            drop, error = "error", str(e)  # located later, for the report's examples only
        if conversation is not None:
            messages = conversation.messages
            if not messages:
                drop = "empty"
            # A user turn at the end teaches nothing (its tokens weigh 0 and would be cut anyway).
            while messages and messages[-1].role == "user":
                messages.pop()
                trailing_user += 1
            has_supervised = False
            for i, message in enumerate(messages):
                if i and message.role == messages[i - 1].role:
                    consecutive += 1  # kept as separate turns: the template renders any order
                if message.role == "user":
                    if message.weight:
                        user_weight_ignored += 1
                    message.weight = 0.0
                else:
                    if message.weight is None:
                        message.weight = job.assistant_weight
                    has_supervised = has_supervised or message.weight > 0
            if not conversation.condition:
                conversation.condition = job.condition
            if not drop:
                if not messages:
                    drop = "no_assistant_turn"
                elif not has_supervised:
                    drop = "zero_weight"
                else:
                    to_render.append(conversation)
                    render_rows.append(row)
        out["index"].append(index)
        out["condition"].append(conversation.condition if conversation is not None else job.condition)
        out["_drop"].append(drop)
        out["_error"].append(error)
        out["_trailing_user"].append(trailing_user)
        out["_consecutive"].append(consecutive)
        out["_user_weight_ignored"].append(user_weight_ignored)

    empty: list = []
    input_ids = [empty] * num_records
    loss_weights = [empty] * num_records
    truncated = [False] * num_records
    supervised = [0] * num_records
    weight_sum = [0.0] * num_records
    if to_render:
        template = TEMPLATES[job.template]
        ids_list: list[list[int]] = []
        weights_list: list[list[float]] = []
        for start in range(0, len(to_render), RENDER_CHUNK):
            ids_chunk, weights_chunk = render_batch(to_render[start:start + RENDER_CHUNK], template, tokenizer,
                                                    per_sequence_loss=job.per_sequence_loss)
            ids_list.extend(ids_chunk)
            weights_list.extend(weights_chunk)
        max_context = job.max_context
        for row, ids, weights in zip(render_rows, ids_list, weights_list):
            if len(ids) > max_context:
                ids, weights = ids[:max_context], weights[:max_context]
                truncated[row] = True
            end = len(weights)
            while end and not weights[end - 1]:
                end -= 1
            if end < len(weights):
                ids, weights = ids[:end], weights[:end]
            if not end:
                out["_drop"][row] = "truncated_away" if truncated[row] else "zero_weight"
                continue
            input_ids[row] = ids
            loss_weights[row] = weights
            supervised[row] = end - weights.count(0)
            weight_sum[row] = sum(weights)
    out["input_ids"] = input_ids
    out["loss_weights"] = loss_weights
    out["length"] = [len(ids) for ids in input_ids]
    out["source"] = [job.name] * num_records
    out["_truncated"] = truncated
    out["_supervised"] = supervised
    out["_weight_sum"] = weight_sum
    return out


def _record_locations(path: str, indices: list[int]) -> dict[int, str]:
    """``file:line (record N)`` for records of a JSON lines file, ``file (record N)`` otherwise (one scan)."""
    locations = {index: f"{path} (record {index})" for index in indices}
    if path.endswith(".jsonl") and os.path.isfile(path) and indices:
        wanted, last = set(indices), max(indices)
        # Only on errors: count non-blank lines (the JSON reader skips blank ones) to find the records' lines.
        with open(path, encoding="utf-8", errors="replace") as f:
            record = -1
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    record += 1
                    if record in wanted:
                        locations[record] = f"{path}:{line_number} (record {record})"
                    if record >= last:
                        break
    return locations


# --------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
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
    import datasets

    path = os.path.expanduser(source.path)
    at = f" ({where})" if where else ""
    if not _is_local(path):
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
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{line_number}: invalid JSON at column {e.colno}: {e.msg}"
            if not isinstance(record, dict):
                return f"{path}:{line_number}: a record must be a JSON object, got {_short(record)}"
    return None


def _file_signature(path: str) -> dict[str, Any]:
    """Size, mtime and a content hash of a file (whole file up to 64 MiB, else 64 spread 1 MiB samples)."""
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    chunk = 1 << 20
    with open(path, "rb") as f:
        if stat.st_size <= 64 * chunk:
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
        else:
            for i in range(64):
                f.seek((stat.st_size - chunk) * i // 63)
                digest.update(f.read(chunk))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": digest.hexdigest()}


# --------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------


# Loaded tokenizers and their fingerprints, keyed by template and the tokenizer directory's file signatures:
# loading and fingerprinting take seconds, and the trainer, `is_prepared` and `prepare` all need them.
_TOKENIZER_CACHE: dict[tuple, tuple[Any, str]] = {}


def _tokenizer_and_fingerprint(recipe: Recipe) -> tuple[Any, str]:
    from crlft.templates import TEMPLATES, load_tokenizer, tokenizer_fingerprint

    m = recipe.model
    name = m.tokenizer or m.base
    if not m.tokenizer and m.create_if_missing is not None:
        # The demo's base (random weights + the template's tokenizer) does not exist before the first run; create
        # it here so prepare, which runs before any rank, finds its tokenizer.
        from crlft.model import ensure_base_model

        ensure_base_model(recipe)
    if os.path.isdir(name):
        files = tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                             for entry in os.scandir(name) if entry.is_file()))
        key: tuple = (m.template, os.path.abspath(name), files)
    else:
        key = (m.template, name)
    cached = _TOKENIZER_CACHE.get(key)
    if cached is None:
        where = recipe.where("model", "tokenizer" if m.tokenizer else "base")
        try:
            tokenizer = load_tokenizer(name, TEMPLATES[m.template])
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: cannot load the tokenizer from {name!r}: {e}") from None
        cached = (tokenizer, tokenizer_fingerprint(tokenizer))
        if len(_TOKENIZER_CACHE) >= 4:
            _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = cached
    return cached


def _tokenizer(recipe: Recipe):
    return _tokenizer_and_fingerprint(recipe)[0]


def _expected_meta(recipe: Recipe, tokenizer_fingerprint: str) -> dict[str, Any]:
    """Everything the prepared rows depend on, as plain JSON data (compared to decide reuse)."""
    from crlft import __version__

    d = recipe.data
    sources = []
    for s in d.sources:
        entry = dataclasses.asdict(s)
        path = os.path.expanduser(s.path)
        entry["file"] = _file_signature(path) if os.path.isfile(path) else None
        sources.append(entry)
    inputs = {
        "format_version": PREPARED_FORMAT_VERSION,
        "crlft_version": __version__,
        "template": recipe.model.template,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "max_context": recipe.model.max_context,
        "reward_to_weight": d.reward_to_weight,
        "beta": d.beta,
        "per_sequence_loss": d.per_sequence_loss,
        "sources": sources,
    }
    return json.loads(json.dumps(inputs))  # the form it has after a round trip through the file


def _read_meta(output_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(output_dir, META_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_prepared(recipe: Recipe) -> bool:
    """Whether ``data.output_dir`` holds a complete dataset prepared from exactly these inputs.

    Loads the tokenizer (never model weights; cached per process) and hashes the source files.

    Args:
        recipe: The recipe.

    Returns:
        True when ``crlft prepare`` would reuse the output as it is.
    """
    meta = _read_meta(recipe.data.output_dir)
    if meta is None:
        return False
    return meta.get("inputs") == _expected_meta(recipe, _tokenizer_and_fingerprint(recipe)[1])


def load_prepared(recipe: Recipe, check: bool = True):
    """The prepared dataset of a recipe (``datasets.Dataset``; columns as described in this module's docstring).

    Args:
        recipe: The recipe.
        check: Verify first that the output matches the recipe's current inputs (loads the tokenizer).

    Raises:
        UserError: Nothing prepared yet, or prepared from other inputs (run ``crlft prepare`` again).
    """
    import datasets

    output_dir = recipe.data.output_dir
    if _read_meta(output_dir) is None:
        raise UserError(f"no prepared dataset in {output_dir} ({recipe.where('data', 'output_dir')}); "
                        f"run `crlft prepare {recipe.source_path or 'RECIPE.yaml'}` first")
    if check and not is_prepared(recipe):
        raise UserError(f"the prepared dataset in {output_dir} was made from other inputs (data, template, "
                        f"tokenizer or max_context changed); run `crlft prepare {recipe.source_path or 'RECIPE.yaml'}`")
    return datasets.load_from_disk(output_dir)


def _generate_missing_sources(recipe: Recipe, log: Callable[[str], None]) -> None:
    """Run ``data.generate`` (a shell command, e.g. the demo's data generator) when a local source file is missing.

    Raises:
        UserError: The command fails. (Files still missing afterwards are reported by ``read_source``.)
    """
    command = recipe.data.generate
    missing = [s.path for s in recipe.data.sources
               if _is_local(os.path.expanduser(s.path)) and not os.path.isfile(os.path.expanduser(s.path))]
    if not command or not missing:
        return
    log(f"missing source file(s) {', '.join(missing)}: running data.generate: {command}")
    result = subprocess.run(command, shell=True)
    if result.returncode != 0:
        raise UserError(f"{recipe.where('data', 'generate')}: the command {command!r} failed with exit code "
                        f"{result.returncode}")


def _default_num_proc() -> int:
    try:
        num_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        num_cpus = os.cpu_count() or 1
    return max(1, min(num_cpus, 16))


def _source_job(recipe: Recipe, source: SourceConfig) -> _SourceJob:
    d = recipe.data
    return _SourceJob(
        name=source.name,
        path=os.path.expanduser(source.path),
        format=source.format,
        condition=source.condition,
        assistant_weight=reward_to_weight(source.reward, d.reward_to_weight, d.beta),
        on_error=source.on_error,
        template=recipe.model.template,
        max_context=recipe.model.max_context,
        per_sequence_loss=d.per_sequence_loss,
    )


def _map_source(records, job: _SourceJob, tokenizer, num_proc: int, cache_file: str | None, fingerprint: str):
    """Run ``_process_batch`` over a source's records in ``num_proc`` processes."""
    num_proc = max(1, min(num_proc, len(records)))
    batch_size = max(1, min(MAP_BATCH_SIZE, math.ceil(len(records) / num_proc)))
    # With worker processes on every core, the tokenizer's own thread pool in each worker only oversubscribes the
    # cores; the workers inherit the setting at fork, and the parent's is restored afterwards.
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return records.map(
            _process_batch,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            fn_kwargs={"job": job, "tokenizer": tokenizer},
            remove_columns=records.column_names,
            features=_features(),
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,  # hashing the tokenizer for datasets' own fingerprint would be slow
            load_from_cache_file=False,
            desc=f"tokenize {job.name}",
        )
    finally:
        if saved_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_parallelism


def prepare(recipe: Recipe, *, force: bool = False, num_proc: int | None = None,
            log: Callable[[str], None] = print, stats: dict[str, Any] | None = None) -> str:
    """Tokenize the recipe's sources into ``data.output_dir`` (or reuse it when its inputs are unchanged).

    Args:
        recipe: The validated recipe.
        force: Regenerate even when the output is up to date.
        num_proc: Worker processes; default ``data.num_proc``, else the CPU count (at most 16).
        log: Where progress lines and the report table go.
        stats: If given, receives ``timings`` (seconds per stage) and the ``report`` (for benchmarks).

    Returns:
        The output directory.

    Raises:
        UserError: Bad input (missing file, malformed record, ...) or no conversation left to train on.
    """
    import datasets

    output_dir = recipe.data.output_dir
    _generate_missing_sources(recipe, log)
    tokenizer, fingerprint = _tokenizer_and_fingerprint(recipe)
    meta_inputs = _expected_meta(recipe, fingerprint)
    old_meta = _read_meta(output_dir)
    if not force and old_meta is not None and old_meta.get("inputs") == meta_inputs:
        log(f"{output_dir}: up to date ({old_meta.get('num_rows', '?')} rows); nothing to do")
        return output_dir
    if old_meta is None and os.path.isdir(output_dir) and os.listdir(output_dir):
        # Never delete a directory crlft did not write.
        raise UserError(f"data.output_dir {output_dir} ({recipe.where('data', 'output_dir')}) exists and is not a "
                        "crlft prepared dataset; remove it or choose another directory")

    explicit_num_proc = num_proc or recipe.data.num_proc
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.tmp-", dir=parent)
    try:
        timings: dict[str, float] = {}
        parts, stat_tables, repeats, error_examples = [], [], {}, []
        inputs_hash = hashlib.sha256(json.dumps(meta_inputs, sort_keys=True).encode()).hexdigest()[:16]
        for i, source in enumerate(recipe.data.sources):
            t0 = time.perf_counter()
            records = read_source(source, cache_dir=os.path.join(work_dir, "cache"),
                                  where=recipe.where("data", "sources", i, "path"))
            if source.max_samples is not None and source.max_samples < len(records):
                records = records.select(range(source.max_samples))
            t1 = time.perf_counter()
            # Worker processes pay off only for sources of a few batches, unless asked for explicitly.
            source_num_proc = explicit_num_proc or min(_default_num_proc(), max(1, len(records) // MAP_BATCH_SIZE))
            job = _source_job(recipe, source)
            rows = _map_source(records, job, tokenizer, source_num_proc,
                               os.path.join(work_dir, f"rows-{i}.arrow"), f"{inputs_hash}-{i}")
            t2 = time.perf_counter()
            timings[f"read {source.name}"] = t1 - t0
            timings[f"tokenize {source.name}"] = t2 - t1
            row_stats = rows.data.table.select(["source", "condition", "index", "length", *STAT_COLUMNS])
            stat_tables.append(row_stats)
            error_examples.extend(_error_examples(row_stats, job.path, MAX_ERROR_EXAMPLES - len(error_examples)))
            repeats[source.name] = source.repeat
            keep = _kept_row_numbers(row_stats)
            kept = rows.select(keep) if len(keep) < len(rows) else rows
            kept = kept.remove_columns(list(STAT_COLUMNS))
            parts.extend([kept] * source.repeat)

        report = build_report(stat_tables, repeats, error_examples)
        log(format_report(report))
        if report["total"]["rows"] == 0:
            raise UserError("no conversation left to train on (see the report above)")
        t0 = time.perf_counter()
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        staged = os.path.join(work_dir, "dataset")
        dataset.save_to_disk(staged)
        with open(os.path.join(staged, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        meta = {"inputs": meta_inputs, "num_rows": len(dataset), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(os.path.join(staged, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        _replace_dir(staged, output_dir, os.path.join(work_dir, "old"))
        timings["write"] = time.perf_counter() - t0
        log("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        if stats is not None:
            stats.update(timings=timings, report=report)
        log(f"wrote {len(dataset)} rows to {output_dir} (report: {os.path.join(output_dir, REPORT_FILE)})")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return output_dir


def _error_examples(row_stats, path: str, limit: int) -> list[str]:
    """Located messages of the first ``limit`` skipped records of a source."""
    import pyarrow.compute as pc

    if limit <= 0:
        return []
    errors = row_stats.filter(pc.equal(row_stats.column("_drop"), "error")).slice(0, limit)
    indices = errors.column("index").to_pylist()
    locations = _record_locations(path, indices)
    return [f"{locations[i]}: {message}" for i, message in zip(indices, errors.column("_error").to_pylist())]


def _kept_row_numbers(stats) -> list[int]:
    import numpy as np
    import pyarrow.compute as pc

    return np.flatnonzero(pc.equal(stats.column("_drop"), "").to_numpy(zero_copy_only=False)).tolist()


def _replace_dir(new: str, target: str, trash: str) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first and deleted after."""
    if os.path.exists(target):
        os.rename(target, trash)
    os.rename(new, target)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def build_report(stat_tables: list, repeats: dict[str, int], errors: list[str] = ()) -> dict[str, Any]:
    """Per (source, condition) counts from the per-row statistic columns of ``_process_batch``.

    Args:
        stat_tables: One ``pyarrow.Table`` per source with ``source``, ``condition``, ``length`` and the
            ``STAT_COLUMNS``.
        repeats: ``repeat`` of each source.
        errors: Located messages of (the first) skipped records, kept in the report as examples.

    Returns:
        ``{"groups": [...], "total": {...}, "errors": [...]}``; each group has ``read``, ``kept``, ``truncated``,
        ``dropped`` (by reason), ``tokens``, ``supervised_tokens``, ``mean_weight``, ``repeat``, ``rows``
        (kept × repeat) and the counts of dropped trailing user turns, consecutive same-role turns and ignored
        user-turn weights.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(stat_tables) if stat_tables else None
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    if table is not None and table.num_rows:
        kept = pc.equal(table.column("_drop"), "")
        table = table.append_column("_kept", kept)
        table = table.append_column("_kept_truncated", pc.and_(kept, table.column("_truncated")))
        by_group = table.group_by(["source", "condition"], use_threads=False).aggregate([
            ("length", "count"), ("_kept", "sum"), ("_kept_truncated", "sum"), ("length", "sum"),
            ("_supervised", "sum"), ("_weight_sum", "sum"), ("_trailing_user", "sum"), ("_consecutive", "sum"),
            ("_user_weight_ignored", "sum"),
        ]).to_pylist()
        for g in by_group:
            key = (g["source"], g["condition"])
            supervised = int(g["_supervised_sum"] or 0)
            groups[key] = {
                "source": g["source"], "condition": g["condition"], "read": int(g["length_count"]),
                "kept": int(g["_kept_sum"] or 0), "truncated": int(g["_kept_truncated_sum"] or 0),
                "dropped": {}, "tokens": int(g["length_sum"] or 0), "supervised_tokens": supervised,
                "mean_weight": (g["_weight_sum_sum"] or 0.0) / supervised if supervised else 0.0,
                "repeat": repeats.get(g["source"], 1),
                "trailing_user_turns_dropped": int(g["_trailing_user_sum"] or 0),
                "consecutive_same_role_turns": int(g["_consecutive_sum"] or 0),
                "user_weights_ignored": int(g["_user_weight_ignored_sum"] or 0),
            }
        dropped = table.filter(pc.invert(kept))
        for g in dropped.group_by(["source", "condition", "_drop"], use_threads=False).aggregate(
                [("length", "count")]).to_pylist():
            groups[(g["source"], g["condition"])]["dropped"][g["_drop"]] = int(g["length_count"])
    # Table order: sources in recipe order, then conditions alphabetically.
    order = {name: i for i, name in enumerate(repeats)}
    group_list = sorted(groups.values(), key=lambda g: (order.get(g["source"], len(order)), g["condition"]))
    for g in group_list:
        g["dropped"] = {r: g["dropped"][r] for r in DROP_REASONS if r in g["dropped"]}
        g["rows"] = g["kept"] * g["repeat"]
    total_keys = ("read", "kept", "truncated", "tokens", "supervised_tokens", "rows",
                  "trailing_user_turns_dropped", "consecutive_same_role_turns", "user_weights_ignored")
    total: dict[str, Any] = {k: sum(g[k] for g in group_list) for k in total_keys}
    total["dropped"] = {r: sum(g["dropped"].get(r, 0) for g in group_list) for r in DROP_REASONS}
    total["dropped"] = {r: n for r, n in total["dropped"].items() if n}
    weight_sum = sum(g["mean_weight"] * g["supervised_tokens"] for g in group_list)
    total["mean_weight"] = weight_sum / total["supervised_tokens"] if total["supervised_tokens"] else 0.0
    total["tokens_per_epoch"] = sum(g["tokens"] * g["repeat"] for g in group_list)
    return {"groups": group_list, "total": total, "errors": list(errors)}


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table (one line per source and condition, then the total)."""
    header = ("source", "condition", "read", "kept", "truncated", "dropped", "tokens", "supervised", "mean w",
              "repeat")

    def line(g: dict[str, Any], source: str, condition: str) -> tuple[str, ...]:
        dropped = ", ".join(f"{r} {n}" for r, n in g["dropped"].items()) or "0"
        return (source, repr(condition) if condition else "-", str(g["read"]), str(g["kept"]), str(g["truncated"]),
                dropped, str(g["tokens"]), str(g["supervised_tokens"]), f"{g['mean_weight']:.4g}",
                str(g.get("repeat", "")))

    rows = [header] + [line(g, g["source"], g["condition"]) for g in report["groups"]]
    total = dict(report["total"], repeat="")
    rows.append(line(total, "total", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    numeric = {2, 3, 4, 6, 7, 8, 9}
    text = ["  ".join(cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]
    text.insert(1, "-" * len(text[0]))
    text.insert(len(text) - 1, "-" * len(text[0]))
    t = report["total"]
    notes = [f"rows written (kept × repeat): {t['rows']}, tokens per epoch: {t['tokens_per_epoch']}"]
    if t["trailing_user_turns_dropped"]:
        notes.append(f"trailing user turns dropped (nothing to learn after them): {t['trailing_user_turns_dropped']}")
    if t["consecutive_same_role_turns"]:
        notes.append(f"consecutive same-role turns (kept as separate turns): {t['consecutive_same_role_turns']}")
    if t["user_weights_ignored"]:
        notes.append(f"non-zero weights on user turns (ignored, user tokens weigh 0): {t['user_weights_ignored']}")
    if report["errors"]:
        more = t["dropped"].get("error", 0) - len(report["errors"])
        notes.append("skipped records (on_error: skip):" + "".join(f"\n  {e}" for e in report["errors"])
                     + (f"\n  ... and {more} more" if more > 0 else ""))
    return "\n".join(text + notes)


# --------------------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------------------


def inspect_rows(recipe: Recipe, num_conversations: int, source_name: str | None = None, tokenizer=None) -> list[dict]:
    """The first records of the recipe's sources processed exactly as ``prepare`` does (dropped ones included).

    Args:
        recipe: The recipe.
        num_conversations: How many rows in all, spread over the sources.
        source_name: Only this source.
        tokenizer: The recipe's tokenizer if already loaded.

    Returns:
        Rows with ``input_ids``, ``loss_weights``, ``source``, ``index``, ``condition`` and ``_drop``.
    """
    sources = [s for s in recipe.data.sources if source_name in (None, s.name)]
    if not sources:
        names = ", ".join(s.name for s in recipe.data.sources)
        raise UserError(f"no source named {source_name!r}; the recipe has: {names}")
    _generate_missing_sources(recipe, print)
    tokenizer = tokenizer or _tokenizer(recipe)
    per_source = math.ceil(num_conversations / len(sources))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="crlft-inspect-") as cache_dir:
        for source in sources:
            i = recipe.data.sources.index(source)
            records = read_source(source, cache_dir=cache_dir, where=recipe.where("data", "sources", i, "path"))
            n = min(per_source, len(records), source.max_samples or len(records))
            if n == 0:
                continue
            out = _process_batch(records[:n], list(range(n)), _source_job(recipe, source), tokenizer)
            rows.extend({k: out[k][r] for k in out} for r in range(n))
    return rows[:num_conversations]


def _decode_spans(tokenizer, input_ids: list[int], loss_weights: list[float]) -> list[tuple[str, float]]:
    """Split the text into runs of equal weight; each run's text is the difference of decoded prefixes, so
    word-initial spaces survive (decoding a run alone would strip them)."""
    spans: list[tuple[str, float]] = []
    start, previous_text = 0, ""
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or loss_weights[end] != loss_weights[start]:
            text = tokenizer.decode(input_ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            spans.append((text[len(previous_text):], float(loss_weights[start])))
            start, previous_text = end, text
    return spans


def format_inspected(row: dict, tokenizer, color: bool) -> str:
    """One conversation as text, supervised runs highlighted (ANSI colour) or bracketed ``[[...]]``, with weights."""
    header = (f"=== source {row['source']!r}, record {row['index']}, condition {row['condition']!r}: "
              f"{len(row['input_ids'])} tokens, {row['_supervised']} supervised")
    if row["_drop"]:
        detail = f" ({row['_error']})" if row["_error"] else ""
        return header + f"\n(dropped: {row['_drop']}{detail})"
    if row["_truncated"]:
        header += " (truncated to model.max_context)"
    parts = []
    for text, weight in _decode_spans(tokenizer, row["input_ids"], row["loss_weights"]):
        if not weight:
            parts.append(text)
        elif color:
            parts.append(f"\x1b[1;32m{text}\x1b[0m\x1b[2m⟨w={weight:.4g}⟩\x1b[0m")
        else:
            parts.append(f"[[{text}]](w={weight:.4g})")
    return header + "\n" + "".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _quiet_datasets() -> None:
    import datasets

    # Our own errors say what went wrong and where; datasets' logged errors would only repeat it less clearly.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def prepare_main(argv: list[str]) -> int:
    """``crlft prepare RECIPE.yaml [section.key=value ...] [--force]``."""
    parser = argparse.ArgumentParser(prog="crlft prepare", description="Tokenize the recipe's sources into a "
                                     "training dataset (data.output_dir) and print what was kept and dropped.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--force", action="store_true", help="regenerate even when the output is up to date")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_datasets()
    prepare(recipe, force=args.force)
    return 0


def inspect_main(argv: list[str]) -> int:
    """``crlft inspect RECIPE.yaml [--n N] [--source NAME] [section.key=value ...]``."""
    parser = argparse.ArgumentParser(prog="crlft inspect", description="Show rendered conversations with their "
                                     "supervised tokens highlighted and their loss weights.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--n", type=int, default=3, help="conversations to show (default 3)")
    parser.add_argument("--source", help="only this source")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be ≥ 1")
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_datasets()
    tokenizer = _tokenizer(recipe)
    color = sys.stdout.isatty()
    for row in inspect_rows(recipe, args.n, args.source, tokenizer):
        print(format_inspected(row, tokenizer, color))
        print()
    return 0
