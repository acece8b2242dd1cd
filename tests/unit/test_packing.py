"""Epoch planning, packed-row collation and the resumable loader."""

import threading
import time

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from crlft.collate import IGNORE_INDEX, pack_row
from crlft.loader import PackedLoader
from crlft.packing import EpochPlan, plan_epoch, plan_stats


def lognormal_lengths(n: int, max_tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.5, 1.0, n), 16, max_tokens).astype(np.int64)


def bimodal_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.9, rng.integers(40, 301, n), rng.integers(3000, 8193, n))


def bin_tokens(plan: EpochPlan, lengths: np.ndarray) -> np.ndarray:
    return np.array([[lengths[b].sum() for b in step] for step in plan])


def assert_valid_plan(plan: EpochPlan, lengths: np.ndarray, max_tokens: int, num_ranks: int) -> None:
    steps = list(plan)
    assert all(len(step) == num_ranks for step in steps)
    planned = np.concatenate([b for step in steps for b in step]) if steps else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(planned), np.arange(len(lengths)))  # each exactly once
    tokens = bin_tokens(plan, lengths)
    assert (tokens <= max_tokens).all()
    assert (tokens[:-1] > 0).all()  # only the last step may have empty bins


# ----- plan_epoch -----


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "num_ranks"),
    [
        (lognormal_lengths(6000, 4096), 4096, 1),
        (lognormal_lengths(6000, 4096), 4096, 8),
        (bimodal_lengths(6000), 16384, 3),
        (np.random.default_rng(1).integers(1, 101, 500), 100, 2),
    ],
)
def test_plan_places_every_conversation_once_within_capacity(lengths, max_tokens, num_ranks):
    plan = plan_epoch(lengths, max_tokens, num_ranks, seed=3, epoch=0)
    assert_valid_plan(plan, lengths, max_tokens, num_ranks)


def test_plan_is_valid_on_many_small_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        max_tokens = int(rng.integers(1, 200))
        num_ranks = int(rng.integers(1, 10))
        lengths = rng.integers(1, max_tokens + 1, int(rng.integers(0, 60)))
        plan = plan_epoch(lengths, max_tokens, num_ranks, seed=int(rng.integers(0, 1000)), epoch=0)
        assert_valid_plan(plan, lengths, max_tokens, num_ranks)
    # Enough conversations for several windows, of awkward sizes (most bins cannot be filled exactly).
    for max_tokens, low in ((4096, 2049), (4096, 1), (300, 100)):
        lengths = rng.integers(low, max_tokens + 1, 9000)
        assert_valid_plan(plan_epoch(lengths, max_tokens, 3, seed=1, epoch=0), lengths, max_tokens, 3)


def test_plan_is_deterministic_and_changes_with_epoch_and_seed():
    lengths = lognormal_lengths(5000, 8192)
    a = plan_epoch(lengths, 16384, 4, seed=7, epoch=2)
    b = plan_epoch(lengths.tolist(), 16384, 4, seed=7, epoch=2)
    np.testing.assert_array_equal(a.conversation_indices, b.conversation_indices)
    np.testing.assert_array_equal(a.bin_offsets, b.bin_offsets)
    first_bins = {frozenset(b.tolist()) for step in a for b in step if len(b) > 1}
    for other in (plan_epoch(lengths, 16384, 4, seed=7, epoch=3), plan_epoch(lengths, 16384, 4, seed=8, epoch=2)):
        assert not np.array_equal(other.conversation_indices, a.conversation_indices)
        # Not just a reordering of the same bins: the bins themselves differ.
        repeated = sum(frozenset(b.tolist()) in first_bins for step in other for b in step if len(b) > 1)
        assert repeated < 0.02 * len(first_bins)


def _trend(plan: EpochPlan, lengths: np.ndarray) -> tuple[float, float]:
    """Correlation of length with step position, and mean length of the last quarter over the first quarter."""
    position = np.repeat(np.arange(plan.num_bins) // plan.num_ranks, np.diff(plan.bin_offsets)) / plan.num_steps
    planned = lengths[plan.conversation_indices]
    ratio = planned[position >= 0.75].mean() / planned[position < 0.25].mean()
    return float(np.corrcoef(planned, position)[0, 1]), float(ratio)


@pytest.mark.parametrize("num_ranks", [1, 8])
def test_plan_has_no_length_trend(num_ranks):
    lengths = lognormal_lengths(30000, 8192)
    plan = plan_epoch(lengths, 8192, num_ranks, seed=0, epoch=0)
    correlation, ratio = _trend(plan, lengths)
    assert abs(correlation) < 0.03
    assert 0.95 < ratio < 1.05
    # The measure does see a trend when there is one (longest first in a plain sorted order).
    by_length = np.argsort(-lengths, kind="stable")
    sorted_plan = EpochPlan(by_length, np.arange(len(lengths) + 1), 1)
    correlation, ratio = _trend(sorted_plan, lengths)
    assert correlation < -0.5 and ratio < 0.5


def test_first_steps_are_not_longer_than_the_rest():
    # Steps pass conversations that found no room on to the next step and fill their gaps with short ones from
    # just ahead: neither may make the first steps longer on average or put a length trend into the epoch.
    # Deterministic seeds; the spread between seeds is ~0.015 and ~0.003.
    first_ratios, correlations = [], []
    for seed in range(4):
        lengths = lognormal_lengths(200_000, 8192, seed)
        plan = plan_epoch(lengths, 77824, 8, seed=seed, epoch=0)
        step = np.repeat(np.arange(plan.num_bins) // 8, np.diff(plan.bin_offsets))
        planned = lengths[plan.conversation_indices]
        first_ratios.append(planned[step < plan.num_steps / 16].mean() / planned.mean())
        correlations.append(np.corrcoef(planned, step)[0, 1])
    assert abs(np.mean(first_ratios) - 1) < 0.03
    assert abs(np.mean(correlations)) < 0.0045


@pytest.mark.parametrize(("num_ranks", "max_tokens"), [(1, 16384), (8, 77824)])
@pytest.mark.parametrize("mix", ["lognormal", "bimodal"])
def test_plan_fills_slots_and_balances_ranks(mix, num_ranks, max_tokens):
    lengths = lognormal_lengths(40000, 8192) if mix == "lognormal" else bimodal_lengths(40000)
    stats = plan_stats(plan_epoch(lengths, max_tokens, num_ranks, seed=0, epoch=0), lengths, max_tokens)
    assert stats.num_conversations == len(lengths) and stats.num_tokens == lengths.sum()
    assert stats.slot_efficiency >= 0.995
    assert stats.token_balance_worst < 1.01
    # OpenChat's multipack sampler gives 2.8 (lognormal) and 1.6 (bimodal) here: see benchmarks/bench_packing.py.
    assert stats.attention_balance_mean < 1.1


def test_plan_single_conversation():
    plan = plan_epoch([10], 16, 1, seed=0, epoch=0)
    assert [[b.tolist() for b in step] for step in plan] == [[[0]]]
    plan = plan_epoch([10], 16, 4, seed=0, epoch=0)
    assert [[b.tolist() for b in step] for step in plan] == [[[0], [], [], []]]


def test_plan_fewer_conversations_than_ranks():
    lengths = np.array([5, 9, 3])
    plan = plan_epoch(lengths, 16, 8, seed=1, epoch=0)
    assert_valid_plan(plan, lengths, 16, 8)
    assert plan.num_steps == 1


def test_plan_all_conversations_of_max_tokens():
    lengths = np.full(10, 64)
    plan = plan_epoch(lengths, 64, 4, seed=0, epoch=0)
    assert_valid_plan(plan, lengths, 64, 4)
    assert plan.num_steps == 3
    assert [len(b) for step in plan for b in step] == [1] * 10 + [0, 0]
    stats = plan_stats(plan, lengths, 64)
    assert stats.slot_efficiency == 1.0 and stats.last_step_efficiency == 0.5


def test_plan_of_no_conversations_has_no_steps():
    plan = plan_epoch(np.zeros(0, np.int64), 64, 2, seed=0, epoch=0)
    assert len(plan) == 0 and list(plan) == []


def test_plan_names_the_conversation_that_is_too_long():
    with pytest.raises(ValueError, match=r"conversation 2 has 300 tokens, more than max_tokens=100 \(2 conv"):
        plan_epoch([5, 10, 300, 7, 101], 100, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="conversation 1 has 0 tokens"):
        plan_epoch([5, 0], 100, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="num_ranks"):
        plan_epoch([5], 100, 0, seed=0, epoch=0)


def test_plan_stats_on_a_hand_made_plan():
    lengths = np.array([4, 6, 10, 2, 2])
    # step 0: rank bins [0, 1] (10 tokens, cost 52) and [2] (10 tokens, cost 100); step 1: [3, 4] and [].
    plan = EpochPlan(np.array([0, 1, 2, 3, 4]), np.array([0, 2, 3, 5, 5]), 2)
    stats = plan_stats(plan, lengths, 10)
    assert stats.num_steps == 2 and stats.slot_efficiency == 1.0 and stats.last_step_efficiency == 0.2
    assert stats.token_balance_mean == 1.0
    assert stats.attention_balance_worst == pytest.approx(100 / 76)
    # The same bins seen as one rank accumulating two micro-batches: perfectly balanced.
    assert plan_stats(plan, lengths, 10, grad_accum=2).attention_balance_worst == 1.0


# ----- pack_row -----


def test_pack_row_shifts_within_each_conversation_and_pads_as_own_segment():
    row = pack_row(
        [(np.array([1, 2, 3]), np.array([0.0, 1.0, 0.5])), (np.array([4, 5]), np.array([0.0, 2.0]))],
        pad_to_multiple_of=8,
        pad_token_id=9,
        conditions=["gpt4", "gpt3"],
    )
    assert row["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert row["labels"].tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert row["loss_weights"].tolist() == [[1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]
    assert row["cu_seqlens"].tolist() == [0, 3, 5, 8] and row["cu_seqlens"].dtype == torch.int32
    assert row["max_seqlen"] == 3 and row["num_tokens"] == 5 and row["num_conversations"] == 2
    assert row["segment_conditions"] == ["gpt4", "gpt3"]
    for key in ("input_ids", "position_ids", "labels"):
        assert row[key].dtype == torch.long
    assert row["loss_weights"].dtype == torch.float32


def test_pack_row_masks_targets_of_zero_weight():
    row = pack_row([(np.array([1, 2, 3, 4]), np.array([0.0, 0.0, 1.0, 0.5]))], pad_to_multiple_of=None)
    assert row["labels"].tolist() == [[IGNORE_INDEX, 3, 4, IGNORE_INDEX]]
    assert row["loss_weights"].tolist() == [[0.0, 1.0, 0.5, 0.0]]
    assert row["cu_seqlens"].tolist() == [0, 4] and row["max_seqlen"] == 4


def test_pack_row_adds_no_padding_at_an_exact_multiple():
    row = pack_row([(np.arange(40), np.ones(40)), (np.arange(24), np.ones(24))], pad_to_multiple_of=64)
    assert row["input_ids"].shape == (1, 64) and row["cu_seqlens"].tolist() == [0, 40, 64]
    assert row["position_ids"][0, 40].item() == 0 and row["position_ids"][0, 63].item() == 23


def test_pack_row_of_an_empty_bin_is_zero_weight_padding():
    row = pack_row([], pad_to_multiple_of=64, conditions=[])
    assert row["input_ids"].shape == (1, 64) and row["num_tokens"] == 0 and row["num_conversations"] == 0
    assert (row["labels"] == IGNORE_INDEX).all() and (row["loss_weights"] == 0).all()
    assert row["cu_seqlens"].tolist() == [0, 64] and row["position_ids"][0].tolist() == list(range(64))
    assert pack_row([], pad_to_multiple_of=None)["input_ids"].shape == (1, 1)


def test_pack_row_rejects_ids_and_weights_of_different_lengths():
    with pytest.raises(ValueError, match="conversation 1 of the row: 3 input_ids and 2 loss_weights"):
        pack_row([(np.arange(2), np.ones(2)), (np.arange(3), np.ones(2))])


# ----- PackedLoader -----


def make_dataset(num_conversations: int = 300, seed: int = 0, max_length: int = 120) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    ids, weights, conditions = [], [], []
    for _ in range(num_conversations):
        length = int(rng.integers(2, max_length + 1))
        ids.append(rng.integers(1, 1000, length).astype(np.int32))
        w = rng.choice([0.0, 0.0, 0.1, 1.0], length).astype(np.float32)
        w[0] = 0.0
        weights.append(w)
        conditions.append(str(rng.choice(["gpt4", "gpt3"])))
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "loss_weights": weights,
            "length": [len(x) for x in ids],
            "source": ["test"] * num_conversations,
            "index": list(range(num_conversations)),
            "condition": conditions,
        }
    )


def step_tensors(step) -> list:
    keys = ("input_ids", "position_ids", "labels", "loss_weights", "cu_seqlens")
    return [
        (step.epoch, step.step_in_epoch),
        *[[mb[key] for key in keys] + [mb["conversation_indices"].tolist()] for mb in step.micro_batches],
    ]


def assert_same_steps(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a[0] == b[0]
        for mb_a, mb_b in zip(a[1:], b[1:]):
            for x, y in zip(mb_a, mb_b):
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y)
                else:
                    assert x == y


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepared") / "train"
    make_dataset().save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def test_loader_covers_the_epoch_with_correct_rows_and_global_totals(dataset):
    num_ranks, grad_accum = 2, 2
    loaders = [PackedLoader(dataset, 256, num_ranks, rank, grad_accum, seed=5) for rank in range(num_ranks)]
    seen = []
    for steps in zip(*loaders, strict=True):
        rows = [mb for step in steps for mb in step.micro_batches]
        assert all(len(step.micro_batches) == grad_accum for step in steps)
        assert len({(s.epoch, s.step_in_epoch, s.global_weight_sum) for s in steps}) == 1
        weights = torch.cat([mb["loss_weights"][0] for mb in rows])
        assert steps[0].global_weight_sum == pytest.approx(weights.sum().item(), rel=1e-6)
        assert steps[0].global_num_supervised_tokens == int((weights > 0).sum())
        assert steps[0].global_num_tokens == sum(mb["num_tokens"] for mb in rows)
        for mb in rows:
            assert mb["input_ids"].shape[1] % 64 == 0 and mb["num_tokens"] <= 256
            cu = mb["cu_seqlens"].tolist()
            for k, index in enumerate(mb["conversation_indices"].tolist()):
                np.testing.assert_array_equal(
                    mb["input_ids"][0, cu[k] : cu[k + 1]].numpy(), dataset[index]["input_ids"]
                )
                assert mb["segment_conditions"][k] == dataset[index]["condition"]
            seen.extend(mb["conversation_indices"].tolist())
    assert sorted(seen) == list(range(len(dataset)))
    assert steps[0].step_in_epoch == steps[0].steps_per_epoch - 1 == loaders[0].steps_per_epoch(0) - 1


def test_gradient_accumulation_sees_the_same_bins_as_more_ranks(dataset):
    accumulating = PackedLoader(dataset, 200, num_ranks=1, rank=0, grad_accum=2, seed=1)
    ranks = [PackedLoader(dataset, 200, num_ranks=2, rank=r, grad_accum=1, seed=1) for r in range(2)]
    for acc, rank0, rank1 in zip(accumulating, *ranks, strict=True):
        assert [mb["conversation_indices"].tolist() for mb in acc.micro_batches] == [
            rank0.micro_batches[0]["conversation_indices"].tolist(),
            rank1.micro_batches[0]["conversation_indices"].tolist(),
        ]
        assert acc.global_weight_sum == rank0.global_weight_sum


@pytest.mark.parametrize("where", ["mid_epoch", "before_epoch_end", "at_epoch_end", "after_epoch_end"])
def test_resume_yields_exactly_the_uninterrupted_steps(dataset, where):
    def loader():
        return PackedLoader(dataset, 256, num_ranks=2, rank=1, grad_accum=2, seed=3, num_epochs=3, prefetch=3)

    uninterrupted = [step_tensors(s) for s in loader()]
    steps_in_first_epoch = loader().steps_per_epoch(0)
    consumed = {
        "mid_epoch": 3,
        "before_epoch_end": steps_in_first_epoch - 1,
        "at_epoch_end": steps_in_first_epoch,
        "after_epoch_end": steps_in_first_epoch + 2,
    }[where]
    first = loader()
    iterator = iter(first)
    for _ in range(consumed):
        next(iterator)
    state = first.state_dict()
    iterator.close()
    if where == "at_epoch_end":
        assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(uninterrupted) - consumed
    assert_same_steps([step_tensors(s) for s in resumed], uninterrupted[consumed:])


def test_resume_refuses_another_configuration(dataset):
    state = PackedLoader(dataset, 256, num_ranks=2, rank=0, seed=3).state_dict()
    for other in (
        PackedLoader(dataset, 256, num_ranks=2, rank=0, seed=4),
        PackedLoader(dataset, 256, num_ranks=4, rank=0, seed=3),
        PackedLoader(dataset, 512, num_ranks=2, rank=0, seed=3),
        PackedLoader(dataset.select(range(100)), 256, num_ranks=2, rank=0, seed=3),
    ):
        with pytest.raises(ValueError, match="cannot resume"):
            other.load_state_dict(state)
    # Another rank of the same run resumes from the same state.
    PackedLoader(dataset, 256, num_ranks=2, rank=1, seed=3).load_state_dict(state)
    # Same inputs but another plan (as another numpy's shuffle would give): refused too.
    with pytest.raises(ValueError, match="plan of epoch 0 differs"):
        PackedLoader(dataset, 256, num_ranks=2, rank=1, seed=3).load_state_dict({**state, "plan_crc32": 1})


def test_rank_without_conversations_gets_a_zero_weight_row():
    small = make_dataset(num_conversations=2)
    steps = [next(iter(PackedLoader(small, 256, num_ranks=4, rank=rank, seed=0))) for rank in range(4)]
    # Both conversations (at most 120 tokens each) share one 256-token bin: three ranks have nothing to do.
    empty = [s.micro_batches[0] for s in steps if s.micro_batches[0]["num_tokens"] == 0]
    assert len(empty) == 3
    assert all(mb["input_ids"].shape == (1, 64) and (mb["loss_weights"] == 0).all() for mb in empty)
    assert len({s.global_weight_sum for s in steps}) == 1


def test_loader_stops_its_worker_and_passes_on_its_errors(dataset, monkeypatch):
    loader = PackedLoader(dataset, 256, seed=0, prefetch=1)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert not [t for t in threading.enumerate() if t.name == "crlft-packed-loader"]

    def broken(epoch, step):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(loader, "_make_step", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        next(iter(loader))


def test_loader_rejects_mismatched_rows_and_too_long_conversations():
    bad = datasets.Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3]], "loss_weights": [[0.0, 1.0], [0.0, 1.0]]})
    with pytest.raises(ValueError, match="row 1 has 3 input_ids but 2 loss_weights"):
        PackedLoader(bad, 64)
    too_long = make_dataset(num_conversations=50).add_item(
        {
            "input_ids": list(range(300)),
            "loss_weights": [0.0] + [1.0] * 299,
            "length": 300,
            "source": "sharegpt.json",
            "index": 7,
            "condition": "gpt4",
        }
    )
    with pytest.raises(ValueError, match="row 50 \\(source 'sharegpt.json', index 7\\) has 300 tokens, more than max"):
        PackedLoader(too_long, 256)


def test_loader_reads_a_million_conversations_quickly():
    # Built directly in arrow (a Python list of 1M rows would dominate the test's time).
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, 1_000_000)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    weights = np.ones(offsets[-1], np.float32)
    weights[offsets[:-1]] = 0.0
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ones(offsets[-1], np.int32))),
            "loss_weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights)),
        }
    )
    started = time.perf_counter()
    loader = PackedLoader(datasets.Dataset(table), 4096, num_ranks=8, rank=0, seed=0)
    assert time.perf_counter() - started < 30  # about 1 s; generous for a shared, busy machine
    np.testing.assert_array_equal(loader.lengths, lengths)
    step = next(iter(loader))
    assert step.micro_batches[0]["num_tokens"] <= step.global_num_tokens <= 8 * 4096
    row = step.micro_batches[0]
    # Every weight is 1 but the first of each conversation: a row's weight sum is tokens - conversations.
    assert row["loss_weights"].sum().item() == row["num_tokens"] - row["num_conversations"]
    assert step.global_weight_sum == step.global_num_supervised_tokens < step.global_num_tokens


def test_weight_totals_are_exact_across_arrow_chunks_slices_and_blocks(monkeypatch):
    import crlft.loader

    rng = np.random.default_rng(1)
    rows = [rng.choice([0.0, 0.5, 1.0, -0.25], int(rng.integers(1, 50))).astype(np.float32) for _ in range(3000)]
    expected = rows[:1000] + rows[1005:]
    for list_type in (pa.list_(pa.float32()), pa.large_list(pa.float32())):
        column = pa.chunked_array([pa.array(rows[:1000], list_type), pa.array(rows[1000:], list_type).slice(5)])
        for block_values in (7, 64, 1 << 22):  # blocks smaller than a row, than a few rows, than the column
            monkeypatch.setattr(crlft.loader, "_TOTALS_BLOCK_VALUES", block_values)
            lengths, sums, counts = crlft.loader._list_column_totals(column)
            np.testing.assert_array_equal(lengths, [len(r) for r in expected])
            np.testing.assert_allclose(sums, [r[1:].astype(np.float64).sum() for r in expected], rtol=1e-12)
            np.testing.assert_array_equal(counts, [(r[1:] > 0).sum() for r in expected])
