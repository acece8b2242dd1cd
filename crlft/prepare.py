"""``crlft prepare``: the recipe's sources → one tokenized dataset in ``data.output_dir``, reused while unchanged.

The output holds one row per conversation (``input_ids`` int32, unshifted ``loss_weights`` float32, ``length``,
``source``, ``index``, ``condition``), ``prepare_report.json`` and ``crlft_meta.json`` (everything the rows depend
on); it is written into a temporary sibling and renamed into place, so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crlft import __version__
from crlft.config import Recipe, SourceConfig
from crlft.errors import UserError
from crlft.formats import is_local_path, read_source, reward_to_weight
from crlft.report import build_report, format_report
from crlft.rows import STAT_COLUMNS, SourceJob, process_batch, record_locations, row_features
from crlft.sourcescan import readable_copy, scan_json_source
from crlft.split import eval_split_path, held_out_mask
from crlft.templates import TEMPLATES, Template
from crlft.tokenizer import load_tokenizer, tokenizer_fingerprint

META_FILE = "crlft_meta.json"
REPORT_FILE = "prepare_report.json"

# Bump when the rows prepare writes change for the same inputs, so older outputs are regenerated.
PREPARED_FORMAT_VERSION = 1

# Records per map batch: large enough that datasets' per-batch work is amortised.
MAP_BATCH_SIZE = 1000

# How many skipped-record messages the report keeps (the count is always complete).
MAX_ERROR_EXAMPLES = 20


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



# Loaded tokenizers and their fingerprints, keyed by template and the tokenizer directory's file signatures:
# loading and fingerprinting take seconds, and the trainer, `is_prepared` and `prepare` all need them.
_TOKENIZER_CACHE: dict[tuple, tuple[Any, str]] = {}


def _tokenizer_and_fingerprint(recipe: Recipe) -> tuple[Any, str]:
    m = recipe.model
    name = m.tokenizer or m.base
    if not m.tokenizer and m.create_if_missing is not None:
        # The demo's base (random weights + the template's tokenizer) does not exist before the first run; create
        # it here so prepare, which runs before any rank, finds its tokenizer. (Imported here: the model code pulls in
        # transformers' modelling and DeepSpeed, seconds of start-up that `crlft prepare` and `preflight` need only
        # when they create that base.)
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
        expanded = os.path.expanduser(name)
        # A hub id is "name" or "org/name"; anything else that is not a directory is a local path that is missing
        # (named as such, not as a malformed hub id).
        if not os.path.isdir(expanded) and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
            raise UserError(f"{where}: directory not found: {expanded}")
        try:
            tokenizer = load_tokenizer(name, TEMPLATES[m.template])
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: cannot load the tokenizer from {name!r}: {e}") from None
        cached = (tokenizer, tokenizer_fingerprint(tokenizer))
        if len(_TOKENIZER_CACHE) >= 4:
            _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = cached
    return cached


def recipe_tokenizer(recipe: Recipe, template: Template | None = None):
    """The recipe's training tokenizer; a missing base or tokenizer is a located error.

    Args:
        recipe: the recipe.
        template: the template whose chat template the tokenizer should carry (e.g. with the recipe's inference
            condition as its default); None: the recipe's template as registered. Tokens are the same either way.
    """
    tokenizer = _tokenizer_and_fingerprint(recipe)[0]
    if template is not None and template != TEMPLATES[recipe.model.template]:
        tokenizer = copy.copy(tokenizer)  # the cached one keeps its chat template
        tokenizer.chat_template = template.chat_template
    return tokenizer


def _source_entry(source: SourceConfig) -> dict[str, Any]:
    entry = dataclasses.asdict(source)
    path = os.path.expanduser(source.path)
    entry["file"] = _file_signature(path) if os.path.isfile(path) else None
    return entry


def _expected_meta(recipe: Recipe, tokenizer_fingerprint: str) -> dict[str, Any]:
    """Everything the prepared rows depend on, as plain JSON data (compared to decide reuse)."""
    d = recipe.data
    sources = [_source_entry(s) for s in d.sources]
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
    if d.eval_fraction > 0 or d.eval_sources:  # absent otherwise: datasets prepared without a split stay valid
        inputs["eval"] = {"fraction": d.eval_fraction, "seed": d.eval_seed,
                          "sources": [_source_entry(s) for s in d.eval_sources]}
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
    output_dir = recipe.data.output_dir
    if _read_meta(output_dir) is None:
        raise UserError(f"no prepared dataset in {output_dir} ({recipe.where('data', 'output_dir')}); "
                        f"run `crlft prepare {recipe.source_path or 'RECIPE.yaml'}` first")
    if check and not is_prepared(recipe):
        raise UserError(f"the prepared dataset in {output_dir} was made from other inputs (data, template, "
                        f"tokenizer or max_context changed); run `crlft prepare {recipe.source_path or 'RECIPE.yaml'}`")
    return datasets.load_from_disk(output_dir)


def generate_missing_sources(recipe: Recipe, log: Callable[[str], None]) -> None:
    """Run ``data.generate`` (a shell command, e.g. the demo's data generator) when a local source file is missing.

    Raises:
        UserError: The command fails. (Files still missing afterwards are reported by ``read_source``.)
    """
    command = recipe.data.generate
    missing = [s.path for s in recipe.data.sources
               if is_local_path(os.path.expanduser(s.path)) and not os.path.isfile(os.path.expanduser(s.path))]
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


def source_job(recipe: Recipe, source: SourceConfig, key_path: tuple | None = None) -> SourceJob:
    """What the map workers need to know about a source; a local JSON file's bytes are checked here first.

    ``key_path`` locates the source in the recipe (default: its place in ``data.sources``; held-out files pass
    ``("data", "eval_sources", i)``).

    Raises:
        UserError: An invalid UTF-8 byte or an empty file (``crlft.sourcescan``).
    """
    d = recipe.data
    path = os.path.expanduser(source.path)
    bad_records: dict[int, str] = {}
    if os.path.splitext(path)[1].lower() in (".json", ".jsonl") and os.path.isfile(path):
        if key_path is None:
            key_path = ("data", "sources", recipe.data.sources.index(source))
        bad_records = scan_json_source(path, recipe.where(*key_path, "path"))
    return SourceJob(
        name=source.name,
        path=path,
        format=source.format,
        condition=source.condition,
        assistant_weight=reward_to_weight(source.reward, d.reward_to_weight, d.beta),
        on_error=source.on_error,
        template=recipe.model.template,
        max_context=recipe.model.max_context,
        per_sequence_loss=d.per_sequence_loss,
        bad_records=bad_records,
    )


def readable_source(source: SourceConfig, job: SourceJob, work_dir: str) -> SourceConfig:
    """The source to read: itself, or a copy in ``work_dir`` without the non-finite numbers the reader refuses.

    Raises:
        UserError: Records with non-finite numbers and ``on_error: raise`` (the first one located).
    """
    if not job.bad_records:
        return source
    if job.on_error == "raise":
        first = min(job.bad_records)
        more = len(job.bad_records) - 1
        raise UserError(f"{record_locations(job.path, [first])[first]}: {job.bad_records[first]}"
                        + (f" ({more} more such record(s))" if more else "")
                        + f" (set on_error: skip on source {job.name!r} to skip such records and count them)")
    return dataclasses.replace(source, path=readable_copy(job.path, os.path.join(work_dir, "finite")))


def _map_source(records, job: SourceJob, tokenizer, num_proc: int, cache_file: str | None, fingerprint: str):
    """Run ``process_batch`` over a source's records in ``num_proc`` processes."""
    num_proc = max(1, min(num_proc, len(records)))
    batch_size = max(1, min(MAP_BATCH_SIZE, math.ceil(len(records) / num_proc)))
    # With worker processes on every core, the tokenizer's own thread pool in each worker only oversubscribes the
    # cores; the workers inherit the setting at fork, and the parent's is restored afterwards.
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return records.map(
            process_batch,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            fn_kwargs={"job": job, "tokenizer": tokenizer},
            remove_columns=records.column_names,
            features=row_features(),
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


def wait_for_prepared(recipe: Recipe, timeout_s: float, poll_s: float = 2.0,
                      log: Callable[[str], None] = print) -> str:
    """Wait until another node has prepared ``data.output_dir`` for this recipe (``crlft prepare --wait``).

    On several nodes only node 0 prepares; the others wait here for a complete dataset made from exactly these
    inputs (``prepare`` writes it in a sibling directory and renames it into place, with its metadata). The
    inputs are hashed again only when ``crlft_meta.json`` changes, so waiting costs nothing on large data.

    Raises:
        UserError: no such dataset after ``timeout_s`` seconds, with what to check.
    """
    output_dir = recipe.data.output_dir
    meta_path = os.path.join(output_dir, META_FILE)
    deadline = time.monotonic() + timeout_s
    last_seen = None
    while True:
        try:
            stat = os.stat(meta_path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            seen = None
        if seen is not None and seen != last_seen:
            last_seen = seen
            try:
                if is_prepared(recipe):
                    log(f"{output_dir}: prepared by node 0 ({len(load_prepared(recipe, check=False))} rows)")
                    return output_dir
            except (OSError, UserError, ValueError):
                pass  # sources or dataset still being written by node 0
        if time.monotonic() >= deadline:
            raise UserError(
                f"{recipe.where('data', 'output_dir')}: waited {timeout_s:g} s for node 0 to prepare {output_dir} "
                "for this recipe, and it is not there (or was made from other inputs). data.output_dir and the "
                "sources must be on a filesystem every node shares, and node 0 must run the same recipe and "
                "overrides; see node 0's log (or raise CRLFT_PREPARE_WAIT_S)."
            )
        time.sleep(poll_s)


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
    output_dir = recipe.data.output_dir
    generate_missing_sources(recipe, log)
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
        eval_parts, eval_tables, eval_errors = [], [], []
        inputs_hash = hashlib.sha256(json.dumps(meta_inputs, sort_keys=True).encode()).hexdigest()[:16]
        d = recipe.data
        for i, source in enumerate(d.sources):
            kept, row_stats, keep, job = _tokenize_source(recipe, source, ("data", "sources", i),
                                                          f"{inputs_hash}-{i}", tokenizer, explicit_num_proc,
                                                          work_dir, timings)
            error_examples.extend(_error_examples(row_stats, job.path, MAX_ERROR_EXAMPLES - len(error_examples)))
            held_out = held_out_mask(_index_column(kept), d.eval_fraction, d.eval_seed, source.name)
            if held_out.any():  # held out before the repeat: a held-out conversation is never trained on
                in_eval = np.zeros(row_stats.num_rows, dtype=bool)
                in_eval[np.asarray(keep, dtype=np.int64)[held_out]] = True
                eval_parts.append(kept.select(np.flatnonzero(held_out)))
                eval_tables.append(row_stats.filter(pa.array(in_eval)))
                row_stats = row_stats.filter(pa.array(~in_eval))
                kept = kept.select(np.flatnonzero(~held_out))
            stat_tables.append(row_stats)
            repeats[source.name] = source.repeat
            parts.extend([kept] * source.repeat)
        for i, source in enumerate(d.eval_sources):
            kept, row_stats, _, job = _tokenize_source(recipe, source, ("data", "eval_sources", i),
                                                       f"{inputs_hash}-eval-{i}", tokenizer, explicit_num_proc,
                                                       work_dir, timings)
            eval_errors.extend(_error_examples(row_stats, job.path, MAX_ERROR_EXAMPLES - len(eval_errors)))
            eval_parts.append(kept)
            eval_tables.append(row_stats)

        report = build_report(stat_tables, repeats, error_examples)
        if "eval" in meta_inputs:
            eval_names = [s.name for s in d.sources] + [s.name for s in d.eval_sources]
            report["eval"] = build_report(eval_tables, dict.fromkeys(eval_names, 1), eval_errors)
        log(format_report(report))
        if report["total"]["rows"] == 0:
            raise UserError("no conversation left to train on (see the report above)")
        if "eval" in meta_inputs and report["eval"]["total"]["rows"] == 0:
            key = ("data", "eval_sources") if d.eval_sources else ("data", "eval_fraction")
            raise UserError(f"{recipe.where(*key)}: no conversation left to evaluate on (see the report above; "
                            "a source needs ≥ 2 conversations to give one to eval_fraction)")
        t0 = time.perf_counter()
        dataset = _write(parts, eval_parts, report, meta_inputs, work_dir, output_dir)
        timings["write"] = time.perf_counter() - t0
        log("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        if stats is not None:
            stats.update(timings=timings, report=report)
        log(f"wrote {len(dataset)} rows to {output_dir} (report: {os.path.join(output_dir, REPORT_FILE)})")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return output_dir


def _write(parts: list, eval_parts: list, report: dict[str, Any], meta_inputs: dict[str, Any], work_dir: str,
           output_dir: str):
    """Stage the dataset, its eval split, report and metadata in ``work_dir``, then rename it into ``output_dir``."""
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    staged = os.path.join(work_dir, "dataset")
    dataset.save_to_disk(staged)
    num_eval_rows = 0
    if eval_parts:
        eval_dataset = datasets.concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
        eval_dataset.save_to_disk(eval_split_path(staged))
        num_eval_rows = len(eval_dataset)
    with open(os.path.join(staged, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    meta = {"inputs": meta_inputs, "num_rows": len(dataset), "num_eval_rows": num_eval_rows,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(staged, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    _replace_dir(staged, output_dir, os.path.join(work_dir, "old"))
    return dataset


def _tokenize_source(recipe: Recipe, source: SourceConfig, key_path: tuple, fingerprint: str, tokenizer,
                     explicit_num_proc: int | None, work_dir: str, timings: dict[str, float]):
    """Read and tokenize one source: its kept rows (training columns), every record's statistics, the kept row
    numbers and its ``SourceJob``."""
    t0 = time.perf_counter()
    job = source_job(recipe, source, key_path)  # before reading: it refuses files the reader would misread
    records = read_source(readable_source(source, job, work_dir), cache_dir=os.path.join(work_dir, "cache"),
                          where=recipe.where(*key_path, "path"))
    if source.max_samples is not None and source.max_samples < len(records):
        records = records.select(range(source.max_samples))
    t1 = time.perf_counter()
    # Worker processes pay off only for sources of a few batches, unless asked for explicitly.
    num_proc = explicit_num_proc or min(_default_num_proc(), max(1, len(records) // MAP_BATCH_SIZE))
    rows = _map_source(records, job, tokenizer, num_proc, os.path.join(work_dir, f"rows-{fingerprint}.arrow"),
                       fingerprint)
    timings[f"read {source.name}"] = t1 - t0
    timings[f"tokenize {source.name}"] = time.perf_counter() - t1
    row_stats = rows.data.table.select(["source", "condition", "index", "length", *STAT_COLUMNS])
    keep = _kept_row_numbers(row_stats)
    kept = rows.select(keep) if len(keep) < len(rows) else rows
    return kept.remove_columns(list(STAT_COLUMNS)), row_stats, keep, job


def _index_column(dataset) -> np.ndarray:
    return dataset.select_columns(["index"]).with_format("arrow")[:].column("index").to_numpy()


def _error_examples(row_stats, path: str, limit: int) -> list[str]:
    """Located messages of the first ``limit`` skipped records of a source."""
    if limit <= 0:
        return []
    errors = row_stats.filter(pc.equal(row_stats.column("_drop"), "error")).slice(0, limit)
    indices = errors.column("index").to_pylist()
    locations = record_locations(path, indices)
    return [f"{locations[i]}: {message}" for i, message in zip(indices, errors.column("_error").to_pylist())]


def _kept_row_numbers(stats) -> list[int]:
    return np.flatnonzero(pc.equal(stats.column("_drop"), "").to_numpy(zero_copy_only=False)).tolist()


def _replace_dir(new: str, target: str, trash: str) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first and deleted after."""
    if os.path.exists(target):
        os.rename(target, trash)
    os.rename(new, target)
    shutil.rmtree(trash, ignore_errors=True)
