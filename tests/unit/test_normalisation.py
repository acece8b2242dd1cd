"""Global normalisation: the backward scale gives the gradient of the step's loss for any ranks x accumulation."""

import math

import pytest
import torch
from torch import nn

from crlft.collate import IGNORE_INDEX
from crlft.loss import chunked_weighted_cross_entropy, global_denominator, loss_scale_for_backward


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def make_step(num_rows, seed=0):
    """Rows of one global step: different lengths and class mixes (one row holds reward-0.1 data only)."""
    g = torch.Generator().manual_seed(seed)
    hidden, vocab = 6, 13
    emb = nn.Parameter(torch.randn(vocab, hidden, generator=g))
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    rows = []
    for r in range(num_rows):
        n = 5 + 3 * r
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = torch.randint(0, vocab, (n,), generator=g)
        weights = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.1)
        if r == 1:
            weights[:] = 0.1  # a row holding sub-optimal data only
        weights[0] = 0.0
        labels[0] = IGNORE_INDEX
        rows.append((ids, labels, weights))
    return emb, head, rows


def row_loss(emb, head, row, chunk_tokens=4):
    ids, labels, weights = row
    return chunked_weighted_cross_entropy(emb[ids], head, labels, weights, chunk_tokens=chunk_tokens).weighted_ce_sum


def deepspeed_like_gradient(emb, head, rows, world_size, grad_accum, mode):
    """Simulates DeepSpeed: rank r runs micro-batches r*A .. r*A+A-1, engine.backward divides by A, and the
    data-parallel reduction averages the ranks' gradients."""
    params = [emb, head.weight]
    weight_sum = sum(float(w.sum()) for _, _, w in rows)
    num_tokens = sum(int((w != 0).sum()) for _, _, w in rows)
    scale = loss_scale_for_backward(global_denominator(weight_sum, num_tokens, mode), world_size, grad_accum)
    rank_grads = []
    for r in range(world_size):
        acc = [torch.zeros_like(p) for p in params]
        for a in range(grad_accum):
            loss = row_loss(emb, head, rows[r * grad_accum + a]) * scale
            for buf, g in zip(acc, grads(loss / grad_accum, params)):  # engine.backward: loss / A
                buf += g
        rank_grads.append(acc)
    return [sum(rg[i] for rg in rank_grads) / world_size for i in range(len(params))]  # all-reduce mean


@pytest.mark.parametrize("mode", ["weight_sum", "num_tokens"])
@pytest.mark.parametrize("world_size,grad_accum", [(1, 4), (2, 2), (4, 1)])
def test_scale_factor_gives_the_globally_normalised_gradient(mode, world_size, grad_accum):
    emb, head, rows = make_step(4)
    params = [emb, head.weight]
    weights = torch.cat([w for _, _, w in rows])
    denominator = float(weights.sum()) if mode == "weight_sum" else float((weights != 0).sum())
    reference = grads(sum(row_loss(emb, head, row) for row in rows) / denominator, params)
    got = deepspeed_like_gradient(emb, head, rows, world_size, grad_accum, mode)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_per_micro_batch_normalisation_differs():
    """Why we never divide a micro-batch by its own Σw: the gradient then depends on how the step was split, and
    a row holding one class only loses its class weight (0.1 cancels between numerator and denominator)."""
    emb, head, rows = make_step(4)
    params = [emb, head.weight]
    weights = torch.cat([w for _, _, w in rows])
    global_grad = grads(sum(row_loss(emb, head, row) for row in rows) / weights.sum(), params)
    per_row = grads(sum(row_loss(emb, head, row) / row[2].sum() for row in rows) / len(rows), params)
    assert not torch.allclose(per_row[0], global_grad[0], rtol=1e-3, atol=1e-6)

    # The all-0.1 row: per-row normalisation gives it the same gradient as if its reward were 1.0.
    ids, labels, w = rows[1]
    as_suboptimal = grads(row_loss(emb, head, rows[1]) / w.sum(), params)
    w_expert = torch.where(w != 0, 1.0, 0.0)
    as_expert = grads(row_loss(emb, head, (ids, labels, w_expert)) / w_expert.sum(), params)
    torch.testing.assert_close(as_suboptimal[0], as_expert[0])
    # Global normalisation keeps the 10x difference between the classes.
    denominator = float(weights.sum())
    sub = grads(row_loss(emb, head, rows[1]) / denominator, params)[0]
    exp = grads(row_loss(emb, head, (ids, labels, w_expert)) / denominator, params)[0]
    torch.testing.assert_close(exp, 10 * sub, rtol=1e-5, atol=1e-7)


def test_denominators_and_scale_edge_cases():
    assert global_denominator(12.5, 30, "weight_sum") == 12.5
    assert global_denominator(12.5, 30, "num_tokens") == 30.0
    assert global_denominator(12.5, 30, "weight_sum_row_mean", rows_per_step=8) == 100.0
    with pytest.raises(ValueError, match="rows_per_step"):
        global_denominator(12.5, 30, "weight_sum_row_mean")
    with pytest.raises(ValueError):
        global_denominator(1.0, 1, "per_batch")
    assert loss_scale_for_backward(10.0, 8, 2) == pytest.approx(1.6)
    assert loss_scale_for_backward(0.0, 8, 2) == 0.0  # nothing supervised in the whole step
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            loss_scale_for_backward(bad, 1, 1)
    with pytest.raises(ValueError):
        loss_scale_for_backward(1.0, 0, 1)
