"""A local JSON source's bytes checked before ``datasets`` reads it: UTF-8, not empty, only finite numbers.

``datasets`` (like Python's ``json``) accepts ``NaN``, ``Infinity`` and ``1e999`` and turns them into null, which
the record rules then fill with the source's reward or condition: a record meant to weigh 0.1 would be trained at
1.0 without a word. An invalid UTF-8 byte passes its reader too and fails later, deep in a map worker, without file
or line. One pass over the bytes finds both, and only lines that may hold a non-finite number are parsed.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from crlft.errors import UserError

# Bytes per read; a block always ends at a line end, so no number, character or line is cut in two.
_BLOCK_BYTES = 16 << 20

# What a non-finite JSON number can look like: the constants Python's json accepts, an exponent of 3+ digits, or a
# mantissa long enough to overflow a float. Text inside strings may match too; the parse of the line decides.
_CANDIDATE = re.compile(rb"NaN|Infinity|[eE][+]?[0-9]{3}|[0-9]{300}")


class _NonFinite:
    """A number Python's json would read as nan or ±inf, kept as it is written."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)


def _non_finite_fields(value: Any, path: str = "") -> list[tuple[str, str]]:
    """``(field path, text)`` of every non-finite number in a parsed value, e.g. ``("items[1].weight", "NaN")``."""
    if isinstance(value, _NonFinite):
        return [(path or "<record>", value.text)]
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _non_finite_fields(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _non_finite_fields(item, f"{path}[{i}]")
    return found


def _problem(fields: list[tuple[str, str]]) -> str:
    field, text = fields[0]
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    why = "JSON has no NaN or Infinity" if text.lstrip("-") in ("NaN", "Infinity") else "it overflows a float"
    return (f"{field}: {text} is not a finite number{more} ({why}); a reader would turn it into null, which "
            "silently becomes the source's default")


def scan_json_source(path: str, where: str = "") -> dict[int, str]:
    """Check a ``.json`` / ``.jsonl`` source and find its records that hold a non-finite number.

    Args:
        path: The file (JSON lines, or one JSON list).
        where: The recipe location of the source's ``path``, for error messages.

    Returns:
        ``{record index (0-based): "field: what is wrong"}`` for every record holding ``NaN``, ``Infinity`` or a
        number that overflows a float (``1e999``); empty when there is none.

    Raises:
        UserError: An invalid UTF-8 byte (``file:line``, byte column), or a file without any record.
    """
    at = f" ({where})" if where else ""
    candidate_lines: dict[int, bytes] = {}
    first_byte = b""
    line_base = 1  # the line number of the block's first line
    with open(path, "rb") as f:
        carry = b""
        while True:
            block = f.read(_BLOCK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                if not cut:  # no line end yet: read on
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            if not data:
                break
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                line_start = data.rfind(b"\n", 0, e.start) + 1
                line = line_base + data.count(b"\n", 0, e.start)
                raise UserError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at byte column "
                                f"{e.start - line_start + 1}); a source must be UTF-8 text{at}") from None
            if not first_byte:  # the first byte of the first record (after a UTF-8 byte order mark)
                first_byte = data.removeprefix(b"\xef\xbb\xbf" if line_base == 1 else b"").lstrip()[:1]
            for match in _CANDIDATE.finditer(data):
                line = line_base + data.count(b"\n", 0, match.start())
                if line not in candidate_lines:
                    start = data.rfind(b"\n", 0, match.start()) + 1
                    end = data.find(b"\n", match.start())
                    candidate_lines[line] = data[start:end if end >= 0 else len(data)]
            line_base += data.count(b"\n")
            if not block:
                break
    if not first_byte:
        raise UserError(f"{path}: the file is empty (no records); fill it or remove the source{at}")
    if not candidate_lines:
        return {}
    if first_byte == b"[":  # one JSON list: parse it whole (only when a candidate was seen)
        with open(path, encoding="utf-8-sig") as f:
            try:
                records = _loads(f.read())
            except json.JSONDecodeError:
                return {}  # malformed: read_source locates it
        if not isinstance(records, list):
            return {}
        found = {i: _non_finite_fields(record) for i, record in enumerate(records)}
        return {i: _problem(fields) for i, fields in found.items() if fields}
    bad_lines: dict[int, str] = {}
    for line, raw in candidate_lines.items():
        try:
            fields = _non_finite_fields(_loads(raw.decode("utf-8-sig")))
        except json.JSONDecodeError:
            continue  # malformed: read_source locates it
        if fields:
            bad_lines[line] = _problem(fields)
    return _by_record_index(path, bad_lines) if bad_lines else {}


def _by_record_index(path: str, bad_lines: dict[int, str]) -> dict[int, str]:
    """Re-key line numbers by record index (the reader skips blank lines); only runs when a record is bad."""
    result: dict[int, str] = {}
    last = max(bad_lines)
    with open(path, "rb") as f:
        record = -1
        for line_number, line in enumerate(f, 1):
            if line.strip():
                record += 1
                if line_number in bad_lines:
                    result[record] = bad_lines[line_number]
            if line_number >= last:
                break
    return result




def _null_non_finite(value: Any) -> Any:
    if isinstance(value, _NonFinite):
        return None
    if isinstance(value, dict):
        return {key: _null_non_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_null_non_finite(item) for item in value]
    return value


def readable_copy(path: str, out_dir: str) -> str:
    """A copy of a JSON source with every non-finite number as null, records and lines where they were.

    The reader refuses some of them (``1e999``: "number too big") and so cannot skip only the bad records; the
    records of the copy are skipped by index (``scan_json_source``), so the nulls are never trained on.

    Returns:
        The copy's path (in ``out_dir``, same extension).
    """
    out = os.path.join(out_dir, "finite-" + os.path.basename(path))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8-sig") as f, open(out, "w", encoding="utf-8") as g:
            json.dump(_null_non_finite(_loads(f.read())), g, ensure_ascii=False)
        return out
    with open(path, "rb") as f, open(out, "wb") as g:  # bytes: lines end at "\n" only, as in the scan
        for line in f:
            if _CANDIDATE.search(line):
                try:
                    value = _null_non_finite(_loads(line.decode("utf-8-sig")))
                    line = json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"
                except json.JSONDecodeError:
                    pass  # malformed: the reader locates it
            g.write(line)
    return out


__all__ = ["readable_copy", "scan_json_source"]
