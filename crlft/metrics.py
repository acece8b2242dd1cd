"""Per-condition step metrics: a packed row's sums per condition, all-reduced once, turned into the logged numbers.

The logged loss, the weighted token accuracy, and per condition the loss, accuracy and token count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from crlft.loss import LossParts

# Columns of the per-condition sums tensor.
SUM_FIELDS = ("weighted_ce_sum", "weight_sum", "num_tokens", "ce_sum", "num_correct", "weighted_correct")
_FIELD = {name: i for i, name in enumerate(SUM_FIELDS)}


def token_segments(cu_seqlens: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Segment (conversation) index of every position of a packed row, from its ``cu_seqlens``.

    Positions at or past ``cu_seqlens[-1]`` get the index ``len(cu_seqlens) - 1`` (one past the last segment).
    """
    boundaries = cu_seqlens.to(dtype=torch.long).reshape(-1)[1:]
    positions = torch.arange(num_positions, device=boundaries.device)
    return torch.bucketize(positions, boundaries, right=True)


def per_condition_sums(
    parts: LossParts,
    cu_seqlens: torch.Tensor,
    segment_conditions: Sequence[str],
    conditions: Sequence[str],
) -> torch.Tensor:
    """Per-condition sums of one row, to be summed over micro-batches and all-reduced (SUM) by the trainer.

    Args:
        parts: the row's :class:`LossParts`.
        cu_seqlens: ``[num_segments + 1]`` segment boundaries of the row (a trailing padding segment is allowed).
        segment_conditions: condition name of each real conversation, in row order (the packed row's
            ``segment_conditions``; shorter than the segments when the row ends with padding).
        conditions: the ordered list of all condition names (the same on every rank, e.g. sorted from the
            prepared dataset), which fixes the tensor's rows.

    Returns:
        float64 ``[len(conditions), len(SUM_FIELDS)]`` on the row's device; columns as :data:`SUM_FIELDS`.

    Raises:
        ValueError: on a condition missing from ``conditions``, or weight on a position outside every real
            conversation (padding must carry no weight).
    """
    device = parts.ce.device
    num_positions = parts.ce.shape[0]
    index_of = {c: i for i, c in enumerate(conditions)}
    missing = sorted({c for c in segment_conditions if c not in index_of})
    if missing:
        raise ValueError(f"condition(s) {missing} not in the list of conditions {list(conditions)}")
    segments = token_segments(cu_seqlens.to(device), num_positions)
    num_real = len(segment_conditions)
    outside = segments >= num_real
    if bool(parts.supervised[outside].any()):
        raise ValueError("a position outside the row's conversations (padding) has a non-zero loss weight")
    segment_to_condition = torch.tensor(
        [index_of[c] for c in segment_conditions] + [0], dtype=torch.long, device=device
    )  # the extra entry absorbs padding positions, whose contributions are all zero
    condition_of_token = segment_to_condition[segments.clamp(max=num_real)]

    w = parts.weights.double()
    sup = parts.supervised.double()
    ok = (parts.correct & parts.supervised).double()
    ce = parts.ce.double()
    columns = torch.stack([w * ce, w, sup, ce * sup, ok, w * ok], dim=1)  # order of SUM_FIELDS
    sums = torch.zeros(len(conditions), len(SUM_FIELDS), dtype=torch.float64, device=device)
    sums.index_add_(0, condition_of_token, columns)
    return sums


def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """``num / den`` as a float, NaN when ``den`` is zero."""
    return float(num / den) if float(den) != 0 else float("nan")


def condition_rows(sums: torch.Tensor, conditions: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, row)`` of each condition with supervised tokens in ``sums`` (``<none>`` for the empty condition)."""
    for i, condition in enumerate(conditions):
        if float(sums[i][_FIELD["num_tokens"]]) != 0:
            yield condition or "<none>", sums[i]


def step_metrics(sums: torch.Tensor, conditions: Sequence[str], denominator: float) -> dict[str, float]:
    """The logged numbers of one step from its all-reduced per-condition sums.

    Args:
        sums: ``[len(conditions), len(SUM_FIELDS)]`` summed over every row of the step on every rank.
        conditions: the condition names of the rows of ``sums``.
        denominator: the step's ``D`` (see :func:`global_denominator`).

    Returns:
        ``loss`` (the optimised ``Σ w·CE / D``), ``weighted_accuracy`` (``Σ w·correct / Σ w``), ``accuracy``,
        ``ce`` (unweighted mean CE per supervised token), ``supervised_tokens``, ``weight_sum``, and per condition
        ``loss/<c>`` (``Σ w·CE / Σ w`` within the condition), ``ce/<c>``, ``accuracy/<c>``, ``tokens/<c>``.
        Conditions without tokens in the step are left out.
    """
    s = sums.double().cpu()
    total = s.sum(dim=0)
    f = _FIELD
    metrics: dict[str, float] = {
        "loss": float(total[f["weighted_ce_sum"]]) / denominator if denominator else float("nan"),
        "weighted_accuracy": ratio(total[f["weighted_correct"]], total[f["weight_sum"]]),
        "accuracy": ratio(total[f["num_correct"]], total[f["num_tokens"]]),
        "ce": ratio(total[f["ce_sum"]], total[f["num_tokens"]]),
        "supervised_tokens": float(total[f["num_tokens"]]),
        "weight_sum": float(total[f["weight_sum"]]),
    }
    for name, row in condition_rows(s, conditions):
        metrics[f"loss/{name}"] = ratio(row[f["weighted_ce_sum"]], row[f["weight_sum"]])
        metrics[f"ce/{name}"] = ratio(row[f["ce_sum"]], row[f["num_tokens"]])
        metrics[f"accuracy/{name}"] = ratio(row[f["num_correct"]], row[f["num_tokens"]])
        metrics[f"tokens/{name}"] = float(row[f["num_tokens"]])
    return metrics

__all__ = ["SUM_FIELDS", "condition_rows", "per_condition_sums", "ratio", "step_metrics", "token_segments"]
