"""Attention for packed rows: the backend choice, the crlft_varlen kernel, and FlexAttention's document mask.

The correctness tests compare a packed row (several conversations back to back, position ids restarting at 0,
a trailing padding segment) with each conversation run on its own, on a tiny fp32 Mistral with grouped-query
attention and a sliding window shorter than one of the conversations.
"""


import pytest
import torch
from attention_helpers import LENGTHS, VOCAB, packed_row, per_conversation_logits, tiny_model
from transformers.masking_utils import create_causal_mask

from crlft import attention
from crlft.attention import (
    VARLEN_ATTENTION,
    available_attn_implementations,
    choose_attn_implementation,
    packed_attention_kwargs,
    varlen_attention_forward,
)
from crlft.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_picks_the_padding_free_varlen_kernel_and_logs_it():
    lines = []
    chosen = choose_attn_implementation("auto", "cpu", torch.float32, log=lines.append)
    assert chosen == VARLEN_ATTENTION
    assert available_attn_implementations("cpu", torch.float32) == [VARLEN_ATTENTION]
    assert len(lines) == 1 and lines[0].startswith("attention: crlft_varlen (one scaled_dot_product_attention")
    assert "requested 'auto' on cpu float32" in lines[0]


@pytest.mark.parametrize(
    ("flash", "torch_varlen", "flex", "expected_order"),
    [
        (True, True, True, ["flash_attention_2", VARLEN_ATTENTION, "flex_attention"]),
        (False, True, True, [VARLEN_ATTENTION, "flex_attention"]),
        (False, False, True, ["flex_attention", VARLEN_ATTENTION]),  # the varlen fallback is SDPA per conversation
        (False, False, False, [VARLEN_ATTENTION]),
        (True, False, False, ["flash_attention_2", VARLEN_ATTENTION]),
    ],
)
def test_auto_on_cuda_orders_backends_fastest_first(monkeypatch, flash, torch_varlen, flex, expected_order):
    monkeypatch.setattr(attention, "_flash_attn_usable", lambda device, dtype: flash)
    monkeypatch.setattr(attention, "_torch_varlen_usable", lambda device, dtype: torch_varlen)
    monkeypatch.setattr(attention, "_flex_usable", lambda device, dtype: flex)
    assert available_attn_implementations("cuda:0") == expected_order
    lines = []
    chosen = choose_attn_implementation("auto", "cuda:0", log=lines.append)
    assert chosen == expected_order[0]
    assert f"fastest first: {', '.join(expected_order)}" in lines[0]
    if chosen == VARLEN_ATTENTION and torch_varlen:
        assert "torch.nn.attention.varlen FlashAttention kernel" in lines[0]


def test_real_availability_checks_refuse_kernels_this_cpu_cannot_run():
    cpu = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float32):
        assert not attention._flash_attn_usable(cpu, dtype)
        assert not attention._torch_varlen_usable(cpu, dtype)
        assert not attention._flex_usable(cpu, dtype)  # no FlexAttention backward on CPU


def test_explicit_requests_are_checked_not_silently_replaced():
    lines = []
    assert choose_attn_implementation("sdpa", "cpu", torch.float32, log=lines.append) == "sdpa"
    assert "dense [T, T] block-diagonal mask" in lines[0] and "O(T²)" in lines[0]
    assert choose_attn_implementation(VARLEN_ATTENTION, "cpu", log=lines.append) == VARLEN_ATTENTION
    with pytest.raises(UserError, match=r"'flash_attention_2' cannot run on cpu.*available here: crlft_varlen"):
        choose_attn_implementation("flash_attention_2", "cpu", log=lines.append)
    with pytest.raises(UserError, match="'flex_attention' cannot run on cpu"):
        choose_attn_implementation("flex_attention", "cpu", log=lines.append)
    with pytest.raises(UserError, match="unknown value 'flash'"):
        choose_attn_implementation("flash", "cpu", log=lines.append)


def test_packed_attention_kwargs_give_varlen_backends_the_row_boundaries():
    _, row = packed_row()
    for name in ("flash_attention_2", VARLEN_ATTENTION):
        kwargs = packed_attention_kwargs(row, name)
        assert kwargs["cu_seq_lens_q"].tolist() == [0, 7, 20, 25, 32]  # the padding is its own last segment
        assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == 13
    for name in ("flex_attention", "sdpa", "eager"):
        assert packed_attention_kwargs(row, name) == {}


def test_sdpa_premise_transformers_builds_a_dense_mask_for_packed_rows():
    """Why auto never picks sdpa: for a packed row transformers materialises a [1, 1, T, T] mask."""
    model = tiny_model(sliding_window=None, attn="sdpa")
    _, row = packed_row()
    embeds = model.get_input_embeddings()(row["input_ids"])
    mask = create_causal_mask(model.config, embeds, None, None, position_ids=row["position_ids"])
    num_positions = row["input_ids"].shape[1]
    assert isinstance(mask, torch.Tensor) and mask.shape == (1, 1, num_positions, num_positions)
    assert not bool(mask[0, 0, 10, 3])  # conversation 2 does not see conversation 1


# ---------------------------------------------------------------------------------------------------------------
# crlft_varlen: packed == per conversation, forward and backward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_boundaries", [True, False], ids=["cu_seqlens", "from_position_ids"])
def test_varlen_packed_logits_and_gradients_equal_per_conversation(with_boundaries):
    model = tiny_model()
    name = choose_attn_implementation("auto", "cpu", torch.float32, log=lambda line: None)
    conversations, row = packed_row()
    num_real = sum(LENGTHS)
    probe = torch.randn(num_real, VOCAB, generator=torch.Generator().manual_seed(2))

    reference = per_conversation_logits(model, conversations)[0]
    (reference * probe).sum().backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.set_attn_implementation(name)
    kwargs = packed_attention_kwargs(row, name) if with_boundaries else {}
    packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False, **kwargs).logits[0]
    (packed[:num_real] * probe).sum().backward()

    torch.testing.assert_close(packed[:num_real], reference, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_varlen_without_packing_is_plain_causal_attention_per_batch_row():
    model = tiny_model(sliding_window=None)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    reference = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation(choose_attn_implementation("auto", "cpu", torch.float32, log=lambda line: None))
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, reference, rtol=1e-5, atol=1e-5)


def test_varlen_refuses_what_it_cannot_do():
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="no KV cache"):
        varlen_attention_forward(None, q[:, :, :1], kv, kv, None)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        varlen_attention_forward(None, q, kv, kv, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no attention dropout"):
        varlen_attention_forward(None, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="cu_seqlens covers tokens 0..5 but the row has 6"):
        varlen_attention_forward(None, q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="must equal cu_seq_lens_q"):
        varlen_attention_forward(
            None, q, kv, kv, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="start every conversation"):
        varlen_attention_forward(None, q, kv, kv, None, position_ids=torch.arange(1, 7)[None])


def _reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                           window_size=(-1, -1), enable_gqa=False, **unused):
    """torch.nn.attention.varlen.varlen_attn's documented semantics, in plain PyTorch (it is CUDA-only)."""
    assert cu_seq_q is cu_seq_k and max_q == max_k and not unused
    assert enable_gqa == (query.shape[1] != key.shape[1])
    if enable_gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    left, right = window_size
    is_causal = tuple(window_size) == (-1, 0)
    outputs = []
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        if is_causal:
            allowed &= j <= i
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale))
    return torch.cat(outputs, dim=1).transpose(0, 1)


@pytest.mark.parametrize("window", [None, 4, 64])
def test_torch_varlen_adapter_passes_the_documented_arguments(monkeypatch, window):
    """The CUDA path's call of PyTorch's varlen kernel, checked against that kernel's documented semantics."""
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", _reference_varlen_attn)
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(25, 4, 8, generator=generator)
    k, v = torch.randn(2, 25, 2, 8, generator=generator)
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    got = attention._torch_varlen(q, k, v, cu, 13, 0.3, window)
    expected = attention._segmentwise_sdpa(q, k, v, cu, 0.3, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# flex_attention: transformers' document BlockMask from packed position ids (forward only on CPU)
# ---------------------------------------------------------------------------------------------------------------


def test_torch_varlen_without_enable_gqa_repeats_key_value_heads(monkeypatch):
    """torch 2.11's varlen_attn has no enable_gqa: the K/V heads are repeated instead, with the same result."""
    import torch.nn.attention.varlen as varlen_module
    import torch.nn.functional as F

    from crlft import attention

    def reference(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert query.shape[1] == key.shape[1], "K/V heads must have been repeated"
        parts = []
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
        return torch.cat(parts)

    def with_gqa(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert enable_gqa and key.shape[1] < query.shape[1]
        repeats = query.shape[1] // key.shape[1]
        return reference(query, key.repeat_interleave(repeats, 1), value.repeat_interleave(repeats, 1), cu_q, cu_k,
                         max_q, max_k, scale=scale)

    torch.manual_seed(0)
    query, key, value = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu_seqlens = torch.tensor([0, 6, 10], dtype=torch.int32)
    outputs = []
    for fake in (reference, with_gqa):
        monkeypatch.setattr(varlen_module, "varlen_attn", fake)
        outputs.append(attention._torch_varlen(query, key, value, cu_seqlens, 6, None, None))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert attention._varlen_takes_enable_gqa(with_gqa) and not attention._varlen_takes_enable_gqa(reference)
