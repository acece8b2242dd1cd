"""The prepare report: per source and condition, conversations read, kept, truncated, dropped by reason, tokens."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Report keys of the drop reasons, in the order the table shows them.
DROP_REASONS = ("error", "empty", "no_assistant_turn", "zero_weight", "truncated_away")


def build_report(stat_tables: list, repeats: dict[str, int], errors: list[str] = ()) -> dict[str, Any]:
    """Per (source, condition) counts from the per-row statistic columns of ``process_batch``.

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
    """The report as a text table (one line per source and condition, then the total); with an ``eval`` split, one
    table per split."""
    if "eval" not in report:
        return _format_split(report)
    return "\n".join([
        "train split", _format_split(report), "",
        "eval split (held out, never trained on; evaluated by the trainer)", _format_split(report["eval"], True),
    ])


def _format_split(report: dict[str, Any], held_out: bool = False) -> str:
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
    notes = [f"held out: {t['rows']} conversations, {t['tokens']} tokens, each evaluated once per evaluation"
             if held_out else f"rows written (kept × repeat): {t['rows']}, tokens per epoch: {t['tokens_per_epoch']}"]
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
