"""One batch of records → prepared rows: convert, resolve weights, render, truncate, trim and count (map workers).

Every record gives one row; a dropped record's row has no tokens and its reason in ``_drop``, so the report is
computed from the same columns before dropped rows are filtered out.
"""

from __future__ import annotations

import dataclasses
import os

import datasets

from crlft.conversation import Conversation
from crlft.errors import UserError
from crlft.formats import FORMATS, RecordError
from crlft.render import condition_problem, render_batch
from crlft.templates import TEMPLATES

# Conversations per render_batch call inside a map batch. Measured: the tokenizer needs about 30% less CPU per
# token for a few dozen conversations per call than for a thousand (its per-call working set stays in cache).
RENDER_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class SourceJob:
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
    # Records the byte scan refused before the reader could change them (``crlft.sourcescan``): index → problem.
    bad_records: dict[int, str] = dataclasses.field(default_factory=dict)


# The prepared dataset's columns, and the per-row statistics the report is computed from (not saved).
ROW_COLUMNS = ("input_ids", "loss_weights", "length", "source", "index", "condition")
STAT_COLUMNS = ("_drop", "_truncated", "_trailing_user", "_consecutive", "_user_weight_ignored", "_error",
                "_supervised", "_weight_sum")


def row_features():

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


def process_batch(batch: dict[str, list], indices: list[int], job: SourceJob, tokenizer) -> dict[str, list]:
    """Turn a batch of records into rows: convert, resolve weights, render, truncate, trim, and count.

    Every record gives one row; a dropped record's row has no tokens and its reason in ``_drop`` (the report is
    computed from these columns, then the dropped rows are filtered out).
    """
    convert = FORMATS[job.format]
    problem = condition_problem(job.condition, job.template, tokenizer)
    if problem:
        raise UserError(f"source {job.name!r}: {problem} (data.sources[].condition)")
    keys = list(batch)
    num_records = len(indices)
    out: dict[str, list] = {name: [] for name in (*ROW_COLUMNS, *STAT_COLUMNS)}
    to_render: list[Conversation] = []
    render_rows: list[int] = []
    good_conditions: set[str] = set()
    for row, (index, values) in enumerate(zip(indices, zip(*(batch[k] for k in keys)))):
        drop, error, trailing_user, consecutive, user_weight_ignored = "", "", 0, 0, 0
        conversation = None
        try:
            if index in job.bad_records:
                raise RecordError(job.bad_records[index])
            conversation = convert(dict(zip(keys, values)))
            if conversation.condition and conversation.condition not in good_conditions:
                problem = condition_problem(conversation.condition, job.template, tokenizer)
                if problem:
                    raise RecordError(problem)
                good_conditions.add(conversation.condition)
        except RecordError as e:
            if job.on_error == "raise":
                raise UserError(
                    f"{record_locations(job.path, [index])[index]}: {e} (set on_error: skip on source "
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


def record_locations(path: str, indices: list[int]) -> dict[int, str]:
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
