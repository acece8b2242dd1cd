"""JSON lines: the one reader of ``.jsonl`` files, which names the file and line of a malformed one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


class JsonLineError(ValueError):
    """A line that is not valid JSON: ``line_number`` (1-based), ``column`` and ``reason`` say where and why."""

    def __init__(self, path: str, line_number: int, column: int, reason: str):
        super().__init__(f"{path}:{line_number}: invalid JSON at column {column}: {reason}")
        self.path, self.line_number, self.column, self.reason = path, line_number, column, reason


def read_jsonl(path: str, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for every non-blank line of a JSON-lines file, in order.

    Args:
        path: the file.
        errors: how undecodable UTF-8 is handled (``open``'s ``errors``).

    Raises:
        JsonLineError: at the first line that is not valid JSON.
    """
    with open(path, encoding="utf-8", errors=errors) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonLineError(path, line_number, e.colno, e.msg) from None
            yield line_number, value


__all__ = ["JsonLineError", "read_jsonl"]
