"""``crlft inspect``: the first records of each source processed exactly as ``prepare`` does, shown with weights."""

from __future__ import annotations

import math
import tempfile

from crlft.config import Recipe
from crlft.errors import UserError
from crlft.formats import read_source
from crlft.prepare import generate_missing_sources, readable_source, recipe_tokenizer, source_job
from crlft.rows import process_batch


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
    generate_missing_sources(recipe, print)
    tokenizer = tokenizer or recipe_tokenizer(recipe)
    per_source = math.ceil(num_conversations / len(sources))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="crlft-inspect-") as cache_dir:
        for source in sources:
            i = recipe.data.sources.index(source)
            job = source_job(recipe, source)  # before reading: it refuses files the reader would misread
            records = read_source(readable_source(source, job, cache_dir), cache_dir=cache_dir,
                                  where=recipe.where("data", "sources", i, "path"))
            n = min(per_source, len(records), source.max_samples or len(records))
            if n == 0:
                continue
            out = process_batch(records[:n], list(range(n)), job, tokenizer)
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
