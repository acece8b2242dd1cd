"""A packed row through a tiny random Mistral gives each conversation exactly the logits and loss it gets alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from crlft.collate import IGNORE_INDEX, flash_attention_kwargs, pack_row

VOCAB_SIZE = 512
LENGTHS = (5, 11, 8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The rows are tiny: on a shared, busy CPU the OpenMP threads only wait for each other (0.5 s vs 2 ms a pass).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_mistral(attn_implementation: str) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def conversations() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    examples = []
    for length in LENGTHS:
        ids = rng.integers(1, VOCAB_SIZE, length).astype(np.int32)
        weights = rng.choice([0.0, 0.5, 1.0], length).astype(np.float32)
        weights[0] = 0.0
        examples.append((ids, weights))
    return examples


def alone_logits(model: MistralForCausalLM, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False).logits[0]


def weighted_loss_alone(logits: torch.Tensor, ids: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    targets = torch.as_tensor(ids[1:], dtype=torch.long)
    ce = F.cross_entropy(logits[:-1], targets, reduction="none")
    return (torch.as_tensor(weights[1:]) * ce).sum()


def weighted_loss_packed(logits: torch.Tensor, row: dict) -> torch.Tensor:
    ce = F.cross_entropy(logits[0], row["labels"][0], reduction="none", ignore_index=IGNORE_INDEX)
    return (row["loss_weights"][0] * ce).sum()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("pad_to_multiple_of", [64, None])
def test_packed_logits_and_loss_equal_each_conversation_alone(attn_implementation, pad_to_multiple_of):
    model = tiny_mistral(attn_implementation)
    examples = conversations()
    row = pack_row(examples, pad_to_multiple_of=pad_to_multiple_of)
    assert row["input_ids"].shape[1] == (64 if pad_to_multiple_of else sum(LENGTHS))
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
    total_alone = torch.zeros(())
    cu = row["cu_seqlens"].tolist()
    for k, (ids, weights) in enumerate(examples):
        alone = alone_logits(model, ids)
        torch.testing.assert_close(packed[0, cu[k] : cu[k + 1]], alone, atol=1e-5, rtol=1e-5)
        total_alone = total_alone + weighted_loss_alone(alone, ids, weights)
    torch.testing.assert_close(weighted_loss_packed(packed, row), total_alone, atol=1e-5, rtol=1e-5)


def test_without_restarting_positions_the_conversations_leak_into_each_other():
    # The control for the test above: with ordinary positions 0..T-1 the second conversation attends the first,
    # so equality there really depends on the position ids of the packed row.
    model = tiny_mistral("sdpa")
    examples = conversations()
    row = pack_row(examples, pad_to_multiple_of=None)
    with torch.no_grad():
        leaky = model(input_ids=row["input_ids"], use_cache=False).logits
    start, stop = row["cu_seqlens"][1].item(), row["cu_seqlens"][2].item()
    assert not torch.allclose(leaky[0, start:stop], alone_logits(model, examples[1][0]), atol=1e-3)


def test_flash_attention_kwargs_match_transformers_and_are_ignored_by_sdpa():
    examples = conversations()
    row = pack_row(examples, pad_to_multiple_of=64)
    # flash_attention_2 would infer the same boundaries from position_ids (padding is its own final segment).
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(row["position_ids"])
    kwargs = flash_attention_kwargs(row)
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["max_length_q"] == int(max_q) == kwargs["max_length_k"] == int(max_k)
    model = tiny_mistral("sdpa")
    with torch.no_grad():
        plain = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        with_kwargs = model(
            input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False, **kwargs
        ).logits
    torch.testing.assert_close(with_kwargs, plain, atol=0, rtol=0)


def test_empty_row_runs_forward_and_backward_with_zero_loss():
    model = tiny_mistral("sdpa").train()
    row = pack_row([], pad_to_multiple_of=64)
    logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
    loss = weighted_loss_packed(logits, row)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.requires_grad)
