"""Split a ShareGPT dump into a GPT-4 and a GPT-3.5 source by each record's ``model`` field, as OpenChat did.

A record whose ``model`` contains "gpt-4" (any case, e.g. ``Model: GPT-4``, ``gpt-4-0613``) goes to
``gpt4.jsonl``; every other record goes to ``gpt35.jsonl``, including records without a ``model`` field (OpenChat
treated those as GPT-3.5 too; they are counted separately so the split is never silent). Records are written
unchanged, one JSON object a line, ready for a recipe source with ``format: sharegpt``::

    - {name: gpt4, path: OUT/gpt4.jsonl, format: sharegpt, condition: GPT4 Correct, reward: 1.0}
    - {name: gpt35, path: OUT/gpt35.jsonl, format: sharegpt, condition: GPT3, reward: 0.1}

Usage::

    python data_prep/split_sharegpt.py sharegpt_dump.json OUTDIR

The input is a JSON list of records or JSON lines, each ``{id, model?, conversations}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from crlft.jsonl import read_jsonl


def is_gpt4(model: object) -> bool:
    """Whether a ``model`` field names GPT-4 (contains "gpt-4", any case)."""
    return isinstance(model, str) and "gpt-4" in model.lower()


def read_records(path: str) -> Iterator[dict]:
    """Yield the records of a JSON list or a JSON lines file.

    Raises:
        ValueError: Malformed JSON or a record that is not an object, with file and line.
    """
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path} (record {i}): a record must be a JSON object")
            yield record
        return
    for line_number, record in read_jsonl(path):  # its JsonLineError is a ValueError naming file and line
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: a record must be a JSON object")
        yield record


def split_sharegpt(in_path: str, out_dir: str) -> dict[str, int]:
    """Write ``gpt4.jsonl`` and ``gpt35.jsonl`` into ``out_dir``.

    Args:
        in_path: The ShareGPT dump (JSON list or JSON lines).
        out_dir: Output directory (created).

    Returns:
        Counts: ``total``, ``gpt4``, ``gpt35`` and ``no_model`` (records without a model field, in ``gpt35``).
    """
    os.makedirs(out_dir, exist_ok=True)
    counts = {"total": 0, "gpt4": 0, "gpt35": 0, "no_model": 0}
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("gpt4", "gpt35")}
    with open(paths["gpt4"], "w", encoding="utf-8") as gpt4, open(paths["gpt35"], "w", encoding="utf-8") as gpt35:
        for record in read_records(in_path):
            counts["total"] += 1
            model = record.get("model")
            if model is None or model == "":
                counts["no_model"] += 1
            name = "gpt4" if is_gpt4(model) else "gpt35"
            counts[name] += 1
            (gpt4 if name == "gpt4" else gpt35).write(json.dumps(record, ensure_ascii=False) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command line entry; prints the counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("in_file", help="ShareGPT dump: a JSON list or JSON lines of {id, model?, conversations}")
    parser.add_argument("out_dir", help="where gpt4.jsonl and gpt35.jsonl are written")
    args = parser.parse_args(argv)
    try:
        counts = split_sharegpt(args.in_file, args.out_dir)
    except (OSError, ValueError) as e:
        print(f"split_sharegpt: error: {e}", file=sys.stderr)
        return 2
    print(f"read {counts['total']} records: {counts['gpt4']} GPT-4 → {os.path.join(args.out_dir, 'gpt4.jsonl')}, "
          f"{counts['gpt35']} GPT-3.5 → {os.path.join(args.out_dir, 'gpt35.jsonl')} "
          f"(of which {counts['no_model']} without a model field)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
