"""Steps are random draws of the stream: class and length mix per step against random steps of the same sizes."""

import importlib.util
import logging
import os

import numpy as np
import pytest

from crlft.mixing import compare_with_random, one_class_steps
from crlft.packing import EpochPlan, plan_epoch, plan_stats

_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "bench_packing.py")
_spec = importlib.util.spec_from_file_location("bench_packing", _BENCH)
bench_packing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_packing)  # OpenChat's multipack sampler, the peer the fill is compared with


def test_shared_two_class_mixes_are_the_benchmarks():
    lengths, is_expert = bench_packing.two_class_lognormal(20000, np.random.default_rng(0))
    assert 0.13 < is_expert.mean() < 0.17
    assert 1.7 < np.median(lengths[is_expert]) / np.median(lengths[~is_expert]) < 2.3  # experts ~1000, rest ~500
    lengths, is_expert = bench_packing.two_class_bimodal(20000, np.random.default_rng(0))
    assert (lengths[is_expert] >= 3000).mean() > 2 * (lengths[~is_expert] >= 3000).mean()


@pytest.mark.parametrize(
    ("mix", "num_ranks", "max_tokens", "num_conversations"),
    [
        ("two_class_lognormal", 1, 16384, 40000),
        ("two_class_lognormal", 8, 77824, 40000),
        ("two_class_bimodal", 1, 16384, 40000),
        ("two_class_bimodal", 8, 77824, 40000),
        ("demo_like", 2, 448, 2000),
    ],
)
def test_steps_mix_classes_and_lengths_like_random_draws(mix, num_ranks, max_tokens, num_conversations):
    lengths, is_expert = getattr(bench_packing, mix)(num_conversations, np.random.default_rng(0))
    plan = plan_epoch(lengths, max_tokens, num_ranks, seed=0, epoch=0)
    mixing = compare_with_random(plan, lengths, is_expert, seed=0, epoch=0)
    random_no_expert = mixing.random_no_expert_share
    assert mixing.no_expert_share <= max(2 * random_no_expert, random_no_expert + 0.02)
    assert mixing.expert_share_std <= 1.5 * mixing.random_expert_share_std
    assert mixing.mean_length_std <= 1.5 * mixing.random_mean_length_std
    assert mixing.max_displacement_steps <= 8  # trained within a few steps of its stream position

    stats = plan_stats(plan, lengths, max_tokens)
    multipack, dropped = bench_packing.multipack_baseline(lengths, max_tokens, num_ranks, 0, 0)
    assert stats.slot_efficiency >= plan_stats(multipack, lengths, max_tokens).slot_efficiency
    assert stats.slot_efficiency >= (0.99 if max_tokens >= 4096 else 0.975)
    assert stats.num_conversations == num_conversations  # the sampler drops `dropped`; we drop nothing
    if num_ranks > 1:
        assert stats.attention_balance_mean < 1.05


def test_the_comparison_sees_length_sorted_steps():
    """The measure can fail: steps cut from a length-sorted order (what the previous planner amounted to)."""
    lengths, is_expert = bench_packing.two_class_lognormal(40000, np.random.default_rng(0))
    plan = plan_epoch(lengths, 16384, 1, seed=0, epoch=0)
    by_length = np.argsort(lengths, kind="stable")
    sorted_plan = EpochPlan(by_length, plan.bin_offsets, 1)  # the same step sizes, filled in length order
    mixing = compare_with_random(sorted_plan, lengths, is_expert, seed=0, epoch=0)
    random_no_expert = mixing.random_no_expert_share
    assert mixing.no_expert_share > max(2 * random_no_expert, random_no_expert + 0.02)
    assert mixing.expert_share_std > 1.3 * mixing.random_expert_share_std
    assert mixing.mean_length_std > 3 * mixing.random_mean_length_std
    assert mixing.max_displacement_steps > 100


def test_one_class_steps_on_a_hand_made_plan():
    classes = np.array([0, 0, 1, 1, 0, 0])
    # steps: [0, 1] (one class), [2, 4] (mixed), [3, 5] (mixed; the last step is not measured anyway)
    plan = EpochPlan(np.array([0, 1, 2, 4, 3, 5]), np.array([0, 2, 4, 6]), 1)
    mixing = one_class_steps(plan, classes)
    assert mixing.num_steps == 2 and mixing.num_classes == 2
    assert mixing.one_class_share == 0.5
    # Random pairs from 4 of class 0 and 2 of class 1: P(both 0) + P(both 1) = (4*3 + 2*1) / (6*5).
    assert mixing.random_one_class_share == pytest.approx(14 / 30)


def test_random_one_class_share_matches_simulation():
    rng = np.random.default_rng(0)
    classes = (rng.random(300) < 0.15).astype(int)
    plan = plan_epoch(rng.integers(28, 34, 300), 96, 1, seed=0, epoch=0)  # ~3 conversations per step
    mixing = one_class_steps(plan, classes)
    sizes = np.diff(plan.bin_offsets)[:-1]
    simulated = np.mean([len(set(classes[rng.choice(300, k, replace=False)])) == 1 for _ in range(200) for k in sizes])
    assert mixing.random_one_class_share == pytest.approx(simulated, abs=0.02)


def test_trainer_warns_when_steps_hold_one_class_far_more_than_random(caplog):
    from crlft.mixing import StepMixing
    from crlft.trainer import _log_class_mixing

    class FakeLoader:
        def __init__(self, mixing):
            self.mixing = mixing

        def class_mixing(self, epoch):
            return self.mixing

    with caplog.at_level(logging.INFO, logger="crlft"):
        _log_class_mixing(FakeLoader(StepMixing(69, 2, 0.64, 0.01)), 0)
        _log_class_mixing(FakeLoader(StepMixing(69, 2, 0.014, 0.01)), 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch 1: 64.0% of 69 steps hold one condition only" in warnings[0].getMessage()
    assert any("epoch 2: 1.4% of 69 steps" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
