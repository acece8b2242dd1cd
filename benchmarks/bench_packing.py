"""Benchmark of crlft's epoch planner against OpenChat's multipack sampler (re-implemented here as the baseline).

For two length mixes (log-normal mu=6.5 sigma=1.0 clipped to [16, 8192]; bimodal: 90% uniform 40-300, 10%
uniform 3000-8192) and two layouts (1 rank x 16384 tokens, 8 ranks x 77824 tokens) it prints, for both
planners side by side and as a crlft/baseline ratio: slot efficiency over all steps but the last, conversations
dropped, per-step rank balance (max/mean) of tokens and of attention cost (sum of squared lengths), the
correlation between a conversation's length and its position in the epoch (a length trend), and the planning
time. Then it times PackedLoader's set-up and collation, and crlft's planner on 1M conversations.

The baseline follows OpenChat's ``MultipackDistributedSampler`` (ochat/training_deepspeed/multipack_sampler.py):
shuffle with ``seed + epoch``; for each step, binary-search the longest prefix of the remaining conversations
that first-fit-decreasing packs into ``num_ranks`` bins; stop at the first prefix that needs fewer bins than
ranks, which drops the epoch's tail. OpenChat runs it with numba; this version is plain Python, so its time is
not comparable (it is printed for completeness only).

Run: ``python benchmarks/bench_packing.py`` (about 20 s on 2 busy cores; ``--num-conversations`` to change the
size, ``--skip-million`` to skip the 1M timing). Planning times are the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import datasets
import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # crlft, from a checkout
from crlft.loader import PackedLoader  # noqa: E402
from crlft.mixing import compare_with_random  # noqa: E402
from crlft.packing import EpochPlan, plan_epoch, plan_stats  # noqa: E402


def lognormal_lengths(num_conversations: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal(mu=6.5, sigma=1.0) token lengths clipped to [16, 8192]."""
    return np.clip(rng.lognormal(6.5, 1.0, num_conversations), 16, 8192).astype(np.int64)


def bimodal_lengths(num_conversations: int, rng: np.random.Generator) -> np.ndarray:
    """90% short (uniform 40-300 tokens), 10% long (uniform 3000-8192 tokens)."""
    short = rng.integers(40, 301, num_conversations)
    long = rng.integers(3000, 8193, num_conversations)
    return np.where(rng.random(num_conversations) < 0.9, short, long).astype(np.int64)


def two_class_lognormal(num_conversations: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """15% expert conversations with log-normal lengths of median ~1000 tokens, the rest ~500 (sigma 1.0, clipped to
    [16, 8192]); returns lengths and the expert flag."""
    is_expert = rng.random(num_conversations) < 0.15
    mu = np.where(is_expert, np.log(1000), np.log(500))
    return np.clip(rng.lognormal(mu, 1.0), 16, 8192).astype(np.int64), is_expert


def two_class_bimodal(num_conversations: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The bimodal mix (short 40-300, long 3000-8192 tokens, 10% long overall) with 15% experts, 25% of whom are
    long (7.4% of the rest)."""
    is_expert = rng.random(num_conversations) < 0.15
    is_long = rng.random(num_conversations) < np.where(is_expert, 0.25, 0.0735)
    lengths = np.where(is_long, rng.integers(3000, 8193, num_conversations), rng.integers(40, 301, num_conversations))
    return lengths.astype(np.int64), is_expert


def demo_like(num_conversations: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Like the demo: 15% experts of 29-33 tokens, the rest 28-32 (the demo's classes differ by ~1 token)."""
    is_expert = rng.random(num_conversations) < 0.15
    lengths = np.where(is_expert, rng.integers(29, 34, num_conversations), rng.integers(28, 33, num_conversations))
    return lengths.astype(np.int64), is_expert


def _first_fit_decreasing(sizes: np.ndarray, capacity: int, max_bins: int | None) -> list[list[int]] | None:
    """First-fit-decreasing of ``sizes``; returns bins of local indices, or None if more than ``max_bins`` needed."""
    order = np.argsort(-sizes, kind="stable").tolist()
    sizes_list = sizes.tolist()
    rooms: list[int] = []
    bins: list[list[int]] = []
    for i in order:
        size = sizes_list[i]
        for k, room in enumerate(rooms):
            if room >= size:
                rooms[k] = room - size
                bins[k].append(i)
                break
        else:
            if max_bins is not None and len(rooms) == max_bins:
                return None
            rooms.append(capacity - size)
            bins.append([i])
    return bins


def multipack_baseline(lengths: np.ndarray, max_tokens: int, num_ranks: int, seed: int, epoch: int):
    """OpenChat's multipack allocation: returns (plan of its full steps, number of conversations dropped)."""
    n = len(lengths)
    shuffled = np.random.default_rng(seed + epoch).permutation(n)
    shuffled_lengths = lengths[shuffled]
    cumulative = np.cumsum(shuffled_lengths)
    start, tokens_before = 0, 0
    steps: list[list[np.ndarray]] = []
    while True:
        # The prefix can hold at most what fits in num_ranks full bins; binary search for the longest that packs.
        low = 1
        high = 1 + int(np.searchsorted(cumulative[start:], tokens_before + max_tokens * num_ranks, "right"))
        while high - low > 1:
            mid = (low + high) // 2
            if _first_fit_decreasing(shuffled_lengths[start : start + mid], max_tokens, num_ranks) is not None:
                low = mid
            else:
                high = mid
        bins = _first_fit_decreasing(shuffled_lengths[start : start + low], max_tokens, None)
        if len(bins) < num_ranks:  # the epoch's tail: OpenChat stops here and drops it
            break
        steps.append([shuffled[start + np.asarray(b, dtype=np.int64)] for b in bins])
        start += low
        tokens_before = int(cumulative[start - 1])
    flat = [b for step in steps for b in step]
    offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum([len(b) for b in flat], out=offsets[1:])
    indices = np.concatenate(flat) if flat else np.zeros(0, np.int64)
    return EpochPlan(indices, offsets, num_ranks), n - start


def length_trend(plan: EpochPlan, lengths: np.ndarray) -> float:
    """Pearson correlation between a conversation's length and its step's position in the epoch."""
    steps_of_bins = np.repeat(np.arange(plan.num_bins) // plan.num_ranks, np.diff(plan.bin_offsets))
    return float(np.corrcoef(lengths[plan.conversation_indices], steps_of_bins)[0, 1])


def _timed(repeats: int, fn, *args):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - started)
    return result, best


def loader_throughput(num_conversations: int, num_ranks: int, max_tokens: int, seed: int) -> str:
    """Times PackedLoader's set-up and how fast its worker collates one rank's rows (no consumer work)."""
    lengths = lognormal_lengths(num_conversations, np.random.default_rng(seed))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rng = np.random.default_rng(seed)
    weights = (rng.random(offsets[-1]) < 0.7).astype(np.float32)
    weights[offsets[:-1]] = 0.0
    table = pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(
                pa.array(offsets), pa.array(rng.integers(0, 32000, offsets[-1], dtype=np.int32))
            ),
            "loss_weights": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(weights)),
            "condition": pa.array(rng.choice(["gpt4", "gpt3"], len(lengths))),
        }
    )
    started = time.perf_counter()
    loader = PackedLoader(datasets.Dataset(table), max_tokens, num_ranks, rank=0, seed=seed)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    loader.steps_per_epoch(0)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    num_steps = sum(1 for _ in loader)
    per_step_ms = 1000 * (time.perf_counter() - started) / num_steps
    return (
        f"PackedLoader, {num_conversations} lognormal conversations ({offsets[-1] / 1e6:.0f}M tokens), "
        f"{num_ranks} x {max_tokens}: set-up {setup_s:.2f} s (first read of the data) + planning {plan_s:.2f} s, "
        f"collation {per_step_ms:.1f} ms per step per rank"
    )


def mixing_table(num_conversations: int, seed: int) -> None:
    """Prints how random the steps are for two classes of different lengths, beside random chunks of the stream."""
    cases = [
        ("lognormal", two_class_lognormal, num_conversations, [(1, 16384), (8, 77824)]),
        ("bimodal", two_class_bimodal, num_conversations, [(1, 16384), (8, 77824)]),
        ("demo-like", demo_like, 2000, [(2, 448)]),
    ]
    header = (
        f"{'2-class mix':<12}{'ranks x tokens':>15} {'planner':<9}{'slot eff':>10}{'no-expert steps':>17}"
        f"{'expert-share std':>18}{'mean-len std':>14}{'attn bal':>10}{'max/mean displ.':>17}"
    )
    print(
        "\nMixing: 15% experts, longer than the rest. Each figure beside random chunks of a shuffle with the same "
        "conversations per step (mean of 8); std across steps; displacement in steps from the stream position"
    )
    print(header)
    print("-" * len(header))
    for mix, make, n, layouts in cases:
        lengths, is_expert = make(n, np.random.default_rng(seed))
        for num_ranks, max_tokens in layouts:
            plans = [("crlft", plan_epoch(lengths, max_tokens, num_ranks, seed, 0))]
            plans.append(("openchat", multipack_baseline(lengths, max_tokens, num_ranks, seed, 0)[0]))
            for name, plan in plans:
                stats = plan_stats(plan, lengths, max_tokens)
                m = compare_with_random(plan, lengths, is_expert, seed, 0)
                displacement = f"{m.max_displacement_steps}/{m.mean_displacement_steps:.2f}" if name == "crlft" else ""
                print(
                    f"{mix:<12}{f'{num_ranks} x {max_tokens}':>15} {name:<9}{stats.slot_efficiency:>10.4%}"
                    f"{f'{m.no_expert_share:.2%} ({m.random_no_expert_share:.2%})':>17}"
                    f"{f'{m.expert_share_std / m.random_expert_share_std:.2f}x random':>18}"
                    f"{f'{m.mean_length_std / m.random_mean_length_std:.2f}x random':>14}"
                    f"{stats.attention_balance_mean:>10.3f}{displacement:>17}"
                )


def main() -> None:
    """Runs the benchmark and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-conversations", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="planning time is the best of this many runs")
    parser.add_argument("--skip-million", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    mixes = {
        "lognormal": lognormal_lengths(args.num_conversations, rng),
        "bimodal": bimodal_lengths(args.num_conversations, rng),
    }
    layouts = [(1, 16384), (8, 77824)]
    header = (
        f"{'mix':<10}{'ranks x tokens':>15} {'planner':<9}{'steps':>7}{'slot eff':>10}{'dropped':>9}"
        f"{'tok bal avg/worst':>19}{'attn bal avg/worst':>20}{'len trend':>11}{'plan s':>9}"
    )
    print(
        f"{args.num_conversations} conversations, seed {args.seed}, epoch 0; efficiency over all steps but the "
        "last; balance = max/mean per step over ranks (all steps but the last)"
    )
    print(header)
    print("-" * len(header))
    for mix, lengths in mixes.items():
        for num_ranks, max_tokens in layouts:
            ours, ours_s = _timed(args.repeats, plan_epoch, lengths, max_tokens, num_ranks, args.seed, 0)
            (theirs, dropped), theirs_s = _timed(1, multipack_baseline, lengths, max_tokens, num_ranks, args.seed, 0)
            rows = []
            for name, plan, dropped_count, seconds in (
                ("crlft", ours, len(lengths) - len(ours.conversation_indices), ours_s),
                ("openchat", theirs, dropped, theirs_s),
            ):
                stats = plan_stats(plan, lengths, max_tokens)
                rows.append((name, plan, dropped_count, seconds, stats))
                print(
                    f"{mix:<10}{f'{num_ranks} x {max_tokens}':>15} {name:<9}{stats.num_steps:>7}"
                    f"{stats.slot_efficiency:>10.4%}{dropped_count:>9}"
                    f"{f'{stats.token_balance_mean:.4f}/{stats.token_balance_worst:.4f}':>19}"
                    f"{f'{stats.attention_balance_mean:.3f}/{stats.attention_balance_worst:.3f}':>20}"
                    f"{length_trend(plan, lengths):>11.4f}{seconds:>9.2f}"
                )
            (_, _, _, s_ours, a), (_, _, _, s_theirs, b) = rows
            print(
                f"{'':<10}{'':>15} {'ratio':<9}{a.num_steps / b.num_steps:>7.3f}"
                f"{a.slot_efficiency / b.slot_efficiency:>10.4f}{'':>9}"
                f"{f'{a.token_balance_mean / b.token_balance_mean:.4f}':>19}"
                f"{f'{a.attention_balance_mean / b.attention_balance_mean:.3f}':>20}"
                f"{'':>11}{'(py)':>9}"
            )
    mixing_table(args.num_conversations // 5, args.seed)
    print(loader_throughput(20_000, 8, 77824, args.seed))
    if not args.skip_million:
        lengths = lognormal_lengths(1_000_000, np.random.default_rng(args.seed))
        for num_ranks, max_tokens in layouts:
            plan, seconds = _timed(args.repeats, plan_epoch, lengths, max_tokens, num_ranks, args.seed, 0)
            stats = plan_stats(plan, lengths, max_tokens)
            print(
                f"1M lognormal, {num_ranks} x {max_tokens}: plan_epoch {seconds:.2f} s (best of {args.repeats}), "
                f"{stats.num_steps} steps, slot efficiency {stats.slot_efficiency:.4%}"
            )


if __name__ == "__main__":
    main()
