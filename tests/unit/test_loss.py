"""The C-RLFT loss: chunked weighted CE against a naive reference, and the per-condition metrics of a row."""


import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_mistral
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from crlft.collate import IGNORE_INDEX
from crlft.loss import (
    WeightedLossModel,
    causal_lm_loss_parts,
    chunked_weighted_cross_entropy,
    num_chunks_for,
)
from crlft.metrics import SUM_FIELDS, per_condition_sums, step_metrics, token_segments


def make_row(num_positions, vocab, hidden, seed=0, zero_fraction=0.4, dtype=torch.float32):
    """Hidden states, an lm_head, labels (-100 where the weight is 0) and weights with zeros and two classes."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(num_positions, hidden, generator=g, dtype=dtype)
    head = nn.Linear(hidden, vocab, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=dtype))
    labels = torch.randint(0, vocab, (num_positions,), generator=g)
    weights = torch.where(torch.rand(num_positions, generator=g) < 0.5, 1.0, 0.1)
    weights[torch.rand(num_positions, generator=g) < zero_fraction] = 0.0
    labels[weights == 0] = IGNORE_INDEX
    return h, head, labels, weights


def naive(h, head, labels, weights):
    """Full-logits reference: Σ w · CE over all positions (ignored labels contribute 0)."""
    logits = head(h).float()
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    return (ce * weights).sum(), ce


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------------------------------------- chunked == naive
@pytest.mark.parametrize("method", ["fused", "checkpoint"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 16, 37, 1000])
def test_chunked_matches_naive_values_and_gradients(chunk_tokens, method):
    num_positions = 37  # not a multiple of any chunk size but 1 and 37
    h, head, labels, weights = make_row(num_positions, vocab=50, hidden=8)
    h.requires_grad_(True)

    ref_loss, ref_ce = naive(h, head, labels, weights)
    ref_gh, ref_gw = grads(ref_loss, [h, head.weight])

    parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=chunk_tokens, method=method)
    gh, gw = grads(parts.weighted_ce_sum, [h, head.weight])

    assert parts.weighted_ce_sum.dtype == torch.float32
    torch.testing.assert_close(parts.weighted_ce_sum, ref_loss, rtol=0, atol=1e-6 * max(1.0, ref_loss.abs().item()))
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-6)
    # Logged per-token CE: equal to the reference on supervised positions, 0 elsewhere.
    torch.testing.assert_close(parts.ce, torch.where(weights != 0, ref_ce, 0.0), rtol=1e-6, atol=1e-6)
    logits = head(h).detach()
    expected_correct = (logits.argmax(-1) == labels) & (weights != 0)
    assert torch.equal(parts.correct, expected_correct)
    assert torch.equal(parts.supervised, weights != 0)


@pytest.mark.parametrize("method", ["fused", "checkpoint"])
@pytest.mark.parametrize("num_chunks", [1, 2, 5, 40])
def test_fixed_chunk_count_matches_naive(num_chunks, method):
    """num_chunks (for ZeRO-3) gives the same result, also with more chunks than supervised targets."""
    h, head, labels, weights = make_row(23, vocab=31, hidden=4, seed=1)
    h.requires_grad_(True)
    ref_loss, _ = naive(h, head, labels, weights)
    ref = grads(ref_loss, [h, head.weight])
    parts = chunked_weighted_cross_entropy(h, head, labels, weights, num_chunks=num_chunks, method=method)
    got = grads(parts.weighted_ce_sum, [h, head.weight])
    torch.testing.assert_close(parts.weighted_ce_sum, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_path_calls_lm_head_once_per_row_and_not_in_the_backward():
    """Under ZeRO-3 every lm_head call all-gathers its weight, so every rank must make the same calls: the fused path
    makes exactly one per row (also for a row with nothing supervised) and none in the backward, which only scales
    the gradients computed in the forward."""
    calls = []
    h, head, labels, weights = make_row(40, vocab=11, hidden=4, seed=2)
    head.register_forward_hook(lambda *_: calls.append(1))
    for w in (weights, torch.zeros_like(weights)):  # a full row, and one with nothing supervised
        for num_chunks in (None, 4):
            calls.clear()
            lab = torch.where(w != 0, labels, IGNORE_INDEX)
            parts = chunked_weighted_cross_entropy(
                h.clone().requires_grad_(True), head, lab, w, chunk_tokens=3, num_chunks=num_chunks
            )
            assert len(calls) == 1
            parts.weighted_ce_sum.backward()
            assert len(calls) == 1
    assert "forward" not in head.__dict__  # the module's own forward is back


def test_checkpoint_path_calls_lm_head_the_same_number_of_times_whatever_the_row():
    calls = []
    h, head, labels, weights = make_row(40, vocab=11, hidden=4, seed=2)
    head.register_forward_hook(lambda *_: calls.append(1))
    for w in (weights, torch.zeros_like(weights)):  # a full row, and one with nothing supervised
        calls.clear()
        lab = torch.where(w != 0, labels, IGNORE_INDEX)
        parts = chunked_weighted_cross_entropy(
            h.clone().requires_grad_(True), head, lab, w, num_chunks=4, method="checkpoint"
        )
        assert len(calls) == 4  # forward
        parts.weighted_ce_sum.backward()
        assert len(calls) == 8  # + recomputation of every chunk in the backward
    assert num_chunks_for(77824, 4096) == 19
    assert num_chunks_for(10, 4096) == 1


class ScaledHead(nn.Linear):
    """A Linear subclass whose forward is not F.linear: the fused path must not bypass it."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_auto_falls_back_to_checkpointing_for_other_lm_heads():
    h, head, labels, weights = make_row(25, vocab=13, hidden=4, seed=10)
    scaled = ScaledHead(4, 13, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(head.weight)
    h.requires_grad_(True)
    ref_loss, _ = naive(h, scaled, labels, weights)
    ref = grads(ref_loss, [h, scaled.weight])
    calls = []
    scaled.register_forward_hook(lambda *_: calls.append(1))
    parts = chunked_weighted_cross_entropy(h, scaled, labels, weights, chunk_tokens=4)
    assert len(calls) > 1  # one call per chunk: the checkpointed path
    torch.testing.assert_close(parts.weighted_ce_sum, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(parts.weighted_ce_sum, [h, scaled.weight]), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="plain torch.nn.Linear"):
        chunked_weighted_cross_entropy(h, scaled, labels, weights, method="fused")
    with pytest.raises(ValueError, match="method must be"):
        chunked_weighted_cross_entropy(h, head, labels, weights, method="kernel")


@pytest.mark.parametrize("method", ["fused", "checkpoint"])
def test_bias_gradient_matches_naive(method):
    h, head, labels, weights = make_row(29, vocab=17, hidden=5, seed=11)
    head_b = nn.Linear(5, 17, bias=True)
    with torch.no_grad():
        head_b.weight.copy_(head.weight)
        head_b.bias.normal_()
    h.requires_grad_(True)
    params = [h, head_b.weight, head_b.bias]
    ref_loss, _ = naive(h, head_b, labels, weights)
    ref = grads(ref_loss, params)
    parts = chunked_weighted_cross_entropy(h, head_b, labels, weights, chunk_tokens=6, method=method)
    torch.testing.assert_close(parts.weighted_ce_sum, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(parts.weighted_ce_sum, params), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_gradients_are_scaled_by_the_incoming_gradient_and_only_where_needed():
    """The backward multiplies the forward's gradients by the incoming one (the trainer's loss scale); a frozen
    lm_head gets no gradient; without grad mode nothing is computed for the backward."""
    h, head, labels, weights = make_row(31, vocab=19, hidden=6, seed=12)
    h.requires_grad_(True)
    ref_loss, _ = naive(h, head, labels, weights)
    ref_gh, ref_gw = grads(ref_loss * 0.37, [h, head.weight])
    parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=5)
    gh, gw = grads(parts.weighted_ce_sum * 0.37, [h, head.weight])
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-6)

    head.weight.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=5)
    assert [tuple(t.shape) for t in saved] == [tuple(h.shape)]  # grad_h only: no [V, H] gradient kept
    parts.weighted_ce_sum.backward()
    assert head.weight.grad is None
    torch.testing.assert_close(h.grad, grads(naive(h, head, labels, weights)[0], [h])[0], rtol=1e-6, atol=1e-6)

    head.weight.requires_grad_(True)
    with torch.no_grad():
        parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=5)
    assert parts.weighted_ce_sum.grad_fn is None
    torch.testing.assert_close(parts.weighted_ce_sum, ref_loss.detach(), rtol=1e-6, atol=1e-6)


def test_fused_bf16_gradients_are_scaled_in_fp32():
    """The incoming gradient (the trainer's loss scale, here 1/3) multiplies the bf16 gradients in fp32, rounded
    once: rounding the factor itself to bf16 (0.333984375) would scale the whole update by 1.002."""
    h, head, labels, weights = make_row(20, vocab=30, hidden=8, seed=15, dtype=torch.bfloat16)
    h.requires_grad_(True)
    scale = torch.tensor(1 / 3, dtype=torch.float32)
    unscaled = grads(chunked_weighted_cross_entropy(h, head, labels, weights).weighted_ce_sum, [h, head.weight])
    scaled = grads(chunked_weighted_cross_entropy(h, head, labels, weights).weighted_ce_sum * scale, [h, head.weight])
    for a, b in zip(scaled, unscaled):
        assert torch.equal(a, (b.float() * scale).bfloat16())
        assert not torch.equal(a, b * scale.bfloat16())  # the bf16-rounded factor gives other values


def test_fused_backward_twice_is_an_error_not_a_double_scaling():
    h, head, labels, weights = make_row(12, vocab=9, hidden=4, seed=13)
    h.requires_grad_(True)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights, method="fused")
    parts.weighted_ce_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        parts.weighted_ce_sum.backward()


def test_fused_restores_lm_head_forward_after_an_error():
    h, head, labels, weights = make_row(12, vocab=9, hidden=4, seed=14, zero_fraction=0.0)
    labels[2] = 9  # out of the vocabulary: fails inside the fused forward
    with pytest.raises((RuntimeError, IndexError)):
        chunked_weighted_cross_entropy(h.requires_grad_(True), head, labels, weights, method="fused")
    assert "forward" not in head.__dict__


def test_batched_shapes_accepted():
    h, head, labels, weights = make_row(12, vocab=9, hidden=4, seed=3)
    a = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=5)
    b = chunked_weighted_cross_entropy(h[None], head, labels[None], weights[None], chunk_tokens=5)
    assert torch.equal(a.weighted_ce_sum, b.weighted_ce_sum)


# ---------------------------------------------------------------------------------------------- zero weights
def test_zero_weight_positions_contribute_nothing():
    h, head, labels, weights = make_row(30, vocab=20, hidden=6, seed=4)
    zero = weights == 0
    assert zero.any() and (~zero).any()
    h.requires_grad_(True)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=4)
    (gh,) = grads(parts.weighted_ce_sum, [h])
    assert torch.all(gh[zero] == 0)  # no gradient reaches prompt / padding positions
    assert torch.all(parts.ce[zero] == 0) and not parts.correct[zero].any()

    # Changing the hidden states at zero-weight positions changes nothing.
    h2 = h.detach().clone()
    h2[zero] = torch.randn(int(zero.sum()), h.shape[1]) * 100
    parts2 = chunked_weighted_cross_entropy(h2, head, labels, weights, chunk_tokens=4)
    assert torch.equal(parts2.weighted_ce_sum, parts.weighted_ce_sum.detach())


def test_row_without_supervised_targets_gives_zero_loss_and_zero_gradients():
    h, head, labels, _ = make_row(16, vocab=10, hidden=4, seed=5)
    weights = torch.zeros(16)
    labels = torch.full((16,), IGNORE_INDEX)
    h.requires_grad_(True)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights)
    assert parts.weighted_ce_sum.item() == 0.0
    parts.weighted_ce_sum.backward()
    # The gradients exist (zeros): DeepSpeed expects every rank to produce a gradient for every parameter.
    assert head.weight.grad is not None and torch.all(head.weight.grad == 0)
    assert h.grad is not None and torch.all(h.grad == 0)


def test_weight_on_ignored_label_is_an_error():
    h, head, labels, weights = make_row(8, vocab=10, hidden=4, seed=6, zero_fraction=0.0)
    labels[3] = IGNORE_INDEX
    with pytest.raises(ValueError, match="label -100"):
        chunked_weighted_cross_entropy(h, head, labels, weights)


@pytest.mark.parametrize("method", ["fused", "checkpoint"])
def test_bf16_model_accumulates_in_fp32(method):
    h, head, labels, weights = make_row(20, vocab=30, hidden=8, seed=7, dtype=torch.bfloat16)
    h.requires_grad_(True)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=6, method=method)
    ref, _ = naive(h, head, labels, weights)  # head(h) in bf16, then fp32 CE: the same recipe
    assert parts.weighted_ce_sum.dtype == torch.float32
    torch.testing.assert_close(parts.weighted_ce_sum, ref, rtol=1e-5, atol=1e-5)
    # Gradients: the same bf16 matmuls of the fp32 softmax gradient cast to bf16. grad_h is the same per row;
    # grad_W sums the chunks in bf16 (the naive version in one matmul): a bf16 rounding or two apart.
    got, expected = grads(parts.weighted_ce_sum, [h, head.weight]), grads(ref, [h, head.weight])
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.float().abs().max()))


# ---------------------------------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["fused", "checkpoint"])
def test_no_full_logits_in_forward_or_backward(method):
    """T=8192, V=32002: no op in the forward or backward produces a [T, V]-sized tensor, and the forward saves
    nothing vocabulary-sized for the backward (the fused path keeps the [T, H] and [V, H] gradients, the
    checkpointed one the chunks' inputs); the naive version does both.

    A quarter of the row is supervised (the rest is prompt): selecting those positions is the first saving, the
    chunks of 512 the second. Peak bytes, as opposed to tensor sizes, are measured on CUDA below and in the
    performance benchmark."""
    num_positions, vocab, hidden, chunk = 8192, 32002, 4, 512
    g = torch.Generator().manual_seed(0)
    h = torch.randn(num_positions, hidden, generator=g, requires_grad=True)
    head = nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (num_positions,), generator=g)
    weights = (torch.arange(num_positions) % 4 == 3).float()
    labels[weights == 0] = IGNORE_INDEX

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        parts = chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=chunk, method=method)
    assert max(saved) < vocab * chunk  # nothing of a chunk's logits is kept for the backward
    with mode:
        parts.weighted_ce_sum.backward()
    assert mode.largest <= chunk * vocab
    assert mode.largest < num_positions * vocab // 8

    # The naive version, on meta tensors (shapes only, no memory): it saves and produces [T, V] tensors.
    saved.clear()
    hm = h.detach().to("meta").requires_grad_(True)
    head_m = nn.Linear(hidden, vocab, bias=False, device="meta")
    with LargestTensor() as naive_mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = naive(hm, head_m, labels.to("meta"), weights.to("meta"))
        loss.backward()
    assert naive_mode.largest >= num_positions * vocab
    assert max(saved) >= num_positions * vocab


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured with torch.cuda")
def test_cuda_peak_memory_is_well_below_naive():
    num_positions, vocab, hidden = 8192, 32002, 256
    device = "cuda"
    h = torch.randn(num_positions, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (num_positions,), device=device)
    weights = torch.ones(num_positions, device=device)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    chunked_peak = peak(
        lambda: chunked_weighted_cross_entropy(h, head, labels, weights, chunk_tokens=1024).weighted_ce_sum
    )
    h.grad = None
    head.weight.grad = None
    naive_peak = peak(lambda: naive(h, head, labels, weights)[0])
    print(f"peak extra memory: chunked {chunked_peak / 2**20:.0f} MiB, naive {naive_peak / 2**20:.0f} MiB")
    assert chunked_peak < naive_peak / 4


# ---------------------------------------------------------------------------------------------- per condition
def test_per_condition_sums_and_step_metrics():
    # Row: conversation A (GPT4 Correct, 4 tokens), B (GPT3, 3 tokens), C (GPT4 Correct, 2 tokens), padding (3).
    cu_seqlens = torch.tensor([0, 4, 7, 9, 12], dtype=torch.int32)
    segment_conditions = ["GPT4 Correct", "GPT3", "GPT4 Correct"]
    assert token_segments(cu_seqlens, 12).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    weights = torch.tensor([0, 1, 1, 0, 0, 0.1, 0, 1, 0, 0, 0, 0])
    h, head, labels, _ = make_row(12, vocab=7, hidden=4, seed=8)
    labels = torch.where(weights != 0, labels.clamp(min=0), IGNORE_INDEX)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights)
    conditions = ["GPT3", "GPT4 Correct", "Code"]
    sums = per_condition_sums(parts, cu_seqlens, segment_conditions, conditions)
    assert sums.shape == (3, len(SUM_FIELDS)) and sums.dtype == torch.float64

    ce, ok = parts.ce.double(), parts.correct.double()
    f = {name: i for i, name in enumerate(SUM_FIELDS)}
    gpt4 = [1, 2, 7]
    assert sums[1, f["num_tokens"]] == 3 and sums[0, f["num_tokens"]] == 1 and sums[2].abs().sum() == 0
    torch.testing.assert_close(sums[1, f["weighted_ce_sum"]], ce[gpt4].sum())
    torch.testing.assert_close(sums[0, f["weighted_ce_sum"]], 0.1 * ce[5])
    torch.testing.assert_close(sums[0, f["weight_sum"]], torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(sums[1, f["num_correct"]], ok[gpt4].sum())
    torch.testing.assert_close(sums.sum(0)[f["weighted_ce_sum"]], parts.weighted_ce_sum.double())

    # Two "ranks" with the same row: sums add up, the metrics stay the same.
    reduced = sums + sums
    m = step_metrics(reduced, conditions, denominator=2 * float(weights.sum()))
    torch.testing.assert_close(m["loss"], parts.weighted_ce_sum.item() / float(weights.sum()), rtol=1e-6, atol=0)
    torch.testing.assert_close(m["loss/GPT3"], float(ce[5]), rtol=1e-6, atol=0)
    torch.testing.assert_close(m["ce/GPT4 Correct"], float(ce[gpt4].mean()), rtol=1e-6, atol=0)
    expected_weighted_acc = float((weights.double() * ok).sum() / weights.double().sum())
    torch.testing.assert_close(m["weighted_accuracy"], expected_weighted_acc, rtol=1e-6, atol=0)
    assert m["tokens/GPT4 Correct"] == 6 and m["supervised_tokens"] == 8
    assert "loss/Code" not in m  # no tokens of that condition in the step


def test_per_condition_errors():
    cu_seqlens = torch.tensor([0, 3, 5], dtype=torch.int32)
    weights = torch.tensor([0, 1, 1, 0, 1.0])
    h, head, labels, _ = make_row(5, vocab=7, hidden=4, seed=9)
    labels = torch.where(weights != 0, labels.clamp(min=0), IGNORE_INDEX)
    parts = chunked_weighted_cross_entropy(h, head, labels, weights)
    with pytest.raises(ValueError, match="not in the list"):
        per_condition_sums(parts, cu_seqlens, ["A", "B"], ["A"])
    with pytest.raises(ValueError, match="padding"):  # the second segment is padding but carries weight
        per_condition_sums(parts, cu_seqlens, ["A"], ["A"])



@pytest.mark.parametrize("method", ["fused", "checkpoint"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_causal_lm_path_matches_full_forward_on_a_packed_row(tied, method):
    """Also with lm_head tied to the input embeddings: the shared weight gets both gradients."""
    from crlft.collate import pack_row

    model = tiny_mistral(tied=tied)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 11, 5):
        ids = torch.randint(3, 64, (n,), generator=g)
        w = torch.zeros(n)
        w[n // 2 :] = 1.0 if n != 11 else 0.1
        examples.append((ids.numpy(), w.numpy()))
    row = pack_row(examples, pad_to_multiple_of=8, conditions=["GPT4 Correct", "GPT3", "GPT4 Correct"])

    logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
    ce = F.cross_entropy(logits.float(), row["labels"][0], reduction="none", ignore_index=IGNORE_INDEX)
    reference = (ce * row["loss_weights"][0]).sum()
    ref_grads = grads(reference, list(model.parameters()))

    parts = causal_lm_loss_parts(model, row, chunk_tokens=4, method=method)
    torch.testing.assert_close(parts.weighted_ce_sum, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(parts.weighted_ce_sum, list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    wrapped = WeightedLossModel(model, chunk_tokens=3, num_chunks=5, method=method)
    torch.testing.assert_close(wrapped(row).weighted_ce_sum, reference, rtol=1e-5, atol=1e-6)
    sums = per_condition_sums(parts, row["cu_seqlens"], row["segment_conditions"], ["GPT3", "GPT4 Correct"])
    assert sums[:, SUM_FIELDS.index("num_tokens")].tolist() == [6.0, 4.0 + 3.0]  # shifted: n - n // 2 - 1 each


# ---------------------------------------------------------------------------------------------- ZeRO-3, two ranks
