"""Mean rows on ZeRO-3 partitions: the column sums and row fills each rank does on its flat slice of a parameter add
up to what the whole tensor gives, for any partitioning (rows split across ranks, partitions shorter than a row,
padding), so new token rows are the same with and without ZeRO-3 and no rank gathers the embedding."""

import math

import pytest
import torch

from crlft import zero3_load


def _partitions(flat: torch.Tensor, world_size: int):
    """ZeRO-3's split of a flat tensor: ``ceil(numel / N)`` elements per rank, the last padded (padding left out)."""
    part = math.ceil(flat.numel() / world_size)
    for rank in range(world_size):
        first = rank * part
        yield flat[first: max(min(first + part, flat.numel()), first)], first


CASES = [((37, 5), 30), ((8, 1), 5), ((11,), 9), ((6, 4, 3), 4), ((3, 16), 1)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 50])
@pytest.mark.parametrize("shape,num_rows", CASES)
@pytest.mark.parametrize("chunk_elements", [1 << 22, 7])
def test_partitions_give_the_mean_and_fill_of_the_whole_tensor(shape, num_rows, world_size, chunk_elements,
                                                               monkeypatch):
    monkeypatch.setattr(zero3_load, "_CHUNK_ELEMENTS", chunk_elements)  # 7: whole-row pieces split into chunks
    torch.manual_seed(world_size)
    whole = torch.randn(shape, dtype=torch.float32)
    width = math.prod(shape[1:])
    expected_mean = whole[:num_rows].double().mean(dim=0).reshape(-1)

    sums = sum(zero3_load.column_sums(flat, first, width, num_rows) for flat, first in _partitions(whole.view(-1),
                                                                                                   world_size))
    torch.testing.assert_close(sums / num_rows, expected_mean, rtol=1e-13, atol=0)
    assert torch.equal((sums / num_rows).float(), expected_mean.float())  # the same rows in the training dtype

    filled = whole.clone()
    for flat, first in _partitions(filled.view(-1), world_size):
        zero3_load.fill_flat_rows(flat, first, width, num_rows, expected_mean)
    expected = whole.clone()
    expected[num_rows:] = expected_mean.float().view(shape[1:])
    assert torch.equal(filled, expected)


def test_plain_parameters_use_the_whole_tensor():
    weight = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.bfloat16))
    mean = zero3_load.row_mean(weight, 7)
    assert mean.dtype == torch.float64 and mean.shape == (3,)
    zero3_load.fill_rows(weight, 7, mean)
    expected = weight.data[:7].double().mean(dim=0).to(torch.bfloat16)
    assert all(torch.equal(weight.data[row], expected) for row in range(7, 10))
