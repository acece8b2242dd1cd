"""Loss memory and time: crlft's chunked weighted cross-entropy against the naive full-logits version.

Both compute ``Σ_t w_t · CE(lm_head(h_t), y_t)`` and its gradient (forward + backward) for one packed row of
``T`` positions against a ``V``-token vocabulary from the same hidden states ``h`` (``[T, H]``, fp32, standing in
for the decoder's output) and the same ``lm_head`` (``Linear(H, V)``):

* **naive**: ``logits = lm_head(h).float()`` (``[T, V]``) then ``F.cross_entropy(..., reduction="none")``,
  weighted and summed: what a trainer that calls ``model(...).logits`` does.
* **chunked**: ``crlft.loss.chunked_weighted_cross_entropy`` (supervised positions only, ``chunk_tokens`` at a
  time), by default on its fused path (each chunk's gradients computed in the forward, so the backward does no
  matmul); ``--method checkpoint`` measures its fallback path instead (activation checkpointing, which recomputes
  each chunk's logits in the backward).

Memory is the process's peak resident set size above its size just before the call (``h``, ``lm_head`` and the
labels already resident; their gradients are allocated inside and count), sampled every 5 ms; time is the wall
time of forward + backward, the best of ``--repeats`` runs, the two versions interleaved. The process's CPU time
(all its threads) is printed too: on a CPU shared with other processes it varies less than the wall time, which
also counts the time this process waited for a core. The two results are checked to agree.

Size. The target row is 77,824 positions x 32,002 vocabulary. The naive version's fp32 logits alone are then
77,824 x 32,002 x 4 B = 9.96 GB, and the forward + backward keep about three such ``[T, V]`` tensors alive (logits,
log-softmax, gradient), ~30 GB: more than this 24 GiB machine. So both versions are measured side by side at the
largest of T, T/2, T/4, T/8 whose naive peak fits in half the available memory (``--naive-tokens`` to force
one), and the chunked version alone again at the full T. The naive peak grows linearly with T (every term is
``T x V``), so its full-T figure is extrapolated as ``peak(T_measured) x T / T_measured``, printed as such.
Every position is supervised (``--supervised-fraction 1``): the chunked version's skipping of prompt positions,
worth another ~40% on real data, gives it no advantage here.

Run: ``python benchmarks/bench_loss.py`` (a few minutes on 2 cores); ``--small`` for a seconds-long smoke run;
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

# Before torch starts OpenMP: on a shared CPU, threads that spin while waiting take the cores the other
# processes need and make every small op slow; PASSIVE makes them sleep (set OMP_WAIT_POLICY to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # crlft, from a checkout

from bench_train import PeakRSS, machine_summary, print_and_save  # noqa: E402

from crlft.loss import DEFAULT_CHUNK_TOKENS, chunked_weighted_cross_entropy  # noqa: E402

# [T, V] fp32 tensors alive at once at the naive version's peak (logits, log-softmax, their gradient), for sizing.
_NAIVE_TV_COPIES = 3.5


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def naive_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weights: torch.Tensor):
    """Full ``[T, V]`` logits, per-token cross-entropy, weighted sum."""
    logits = lm_head(hidden).float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * weights).sum()


def make_inputs(num_tokens: int, vocab: int, hidden_size: int, supervised_fraction: float, seed: int):
    """Hidden states (leaf, requires grad), an lm_head, labels and 0/1 weights."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).requires_grad_()
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        lm_head.weight.normal_(0, hidden_size**-0.5, generator=generator)
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator)
    weights = (torch.rand(num_tokens, generator=generator) < supervised_fraction).float()
    labels[weights == 0] = -100
    return hidden, lm_head, labels, weights


def timed_loss(kind: str, inputs, chunk_tokens: int, memory: PeakRSS, phase: str, method: str = "auto"):
    """One forward + backward of ``kind``; returns (wall seconds, process CPU seconds, loss value, gradients)."""
    hidden, lm_head, labels, weights = inputs
    hidden.grad = None
    lm_head.weight.grad = None
    gc.collect()
    with memory.measure(phase):
        started, cpu_started = time.perf_counter(), time.process_time()
        if kind == "naive":
            loss = naive_loss(hidden, lm_head, labels, weights)
        else:
            loss = chunked_weighted_cross_entropy(
                hidden, lm_head, labels, weights, chunk_tokens, method=method
            ).weighted_ce_sum
        loss.backward()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu_seconds, float(loss.detach()), (hidden.grad, lm_head.weight.grad)


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark; returns the figures."""
    vocab, full_tokens = args.vocab, args.tokens
    naive_tokens = args.naive_tokens
    available = available_memory_bytes()
    if naive_tokens is None:
        budget = available / 2
        for divisor in (1, 2, 4, 8, 16):
            naive_tokens = full_tokens // divisor
            if _NAIVE_TV_COPIES * naive_tokens * vocab * 4 <= budget:
                break
    memory = PeakRSS()
    results = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_summary(),
        "available_memory_gib_at_start": available / 2**30,
        "vocab": vocab,
        "hidden_size": args.hidden,
        "chunk_tokens": args.chunk_tokens,
        "method": args.method,
        "supervised_fraction": args.supervised_fraction,
        "repeats": args.repeats,
        "full_tokens": full_tokens,
        "side_by_side_tokens": naive_tokens,
    }

    # Side by side at naive_tokens, interleaved; the first round is a warm-up when repeats > 1.
    inputs = make_inputs(naive_tokens, vocab, args.hidden, args.supervised_fraction, args.seed)
    best = {"chunked": float("inf"), "naive": float("inf")}
    best_cpu = dict(best)
    values, grads = {}, {}
    for _ in range(args.repeats):
        for kind in ("chunked", "naive"):
            seconds, cpu_seconds, value, grad = timed_loss(kind, inputs, args.chunk_tokens, memory, kind, args.method)
            best[kind] = min(best[kind], seconds)
            best_cpu[kind] = min(best_cpu[kind], cpu_seconds)
            values[kind] = value
            grads[kind] = tuple(g.clone() for g in grad)
            print(f"{kind:>8} at {naive_tokens} tokens: {seconds:.2f} s, peak +"
                  f"{memory.above_start[kind] / 2**30:.2f} GiB", flush=True)
    relative_error = abs(values["chunked"] - values["naive"]) / abs(values["naive"])
    max_grad_error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads["chunked"], grads["naive"]))
    assert relative_error < 1e-4 and max_grad_error < 1e-3, (relative_error, max_grad_error)
    del inputs, grads
    gc.collect()
    side = {kind: {"seconds": best[kind], "cpu_seconds": best_cpu[kind],
                   "peak_above_start_gib": memory.above_start[kind] / 2**30,
                   "peak_rss_gib": memory.peaks[kind] / 2**30} for kind in best}
    results["side_by_side"] = side
    results["loss_relative_difference"] = relative_error
    results["grad_max_relative_difference"] = max_grad_error
    results["memory_ratio_chunked_over_naive"] = side["chunked"]["peak_above_start_gib"] / side["naive"][
        "peak_above_start_gib"]
    results["time_ratio_chunked_over_naive"] = side["chunked"]["seconds"] / side["naive"]["seconds"]
    results["cpu_time_ratio_chunked_over_naive"] = side["chunked"]["cpu_seconds"] / side["naive"]["cpu_seconds"]

    if naive_tokens != full_tokens and not args.skip_full:
        inputs = make_inputs(full_tokens, vocab, args.hidden, args.supervised_fraction, args.seed)
        seconds, cpu_seconds, _, _ = timed_loss("chunked", inputs, args.chunk_tokens, memory, "chunked-full",
                                                args.method)
        print(f" chunked at {full_tokens} tokens: {seconds:.2f} s, peak +"
              f"{memory.above_start['chunked-full'] / 2**30:.2f} GiB", flush=True)
        del inputs
        scale = full_tokens / naive_tokens
        results["full"] = {
            "chunked_seconds": seconds,
            "chunked_cpu_seconds": cpu_seconds,
            "chunked_peak_above_start_gib": memory.above_start["chunked-full"] / 2**30,
            "naive_peak_above_start_gib_extrapolated": side["naive"]["peak_above_start_gib"] * scale,
            "naive_seconds_extrapolated": side["naive"]["seconds"] * scale,
            "naive_fp32_logits_gib": full_tokens * vocab * 4 / 2**30,
        }
        results["full"]["memory_ratio_chunked_over_naive"] = (
            results["full"]["chunked_peak_above_start_gib"] / results["full"]["naive_peak_above_start_gib_extrapolated"]
        )
    memory.close()
    return results


def print_table(results: dict) -> None:
    """The human-readable summary."""
    t, v = results["side_by_side_tokens"], results["vocab"]
    print()
    print(f"weighted CE forward+backward, vocab {v}, hidden {results['hidden_size']}, fp32, chunk "
          f"{results['chunk_tokens']} tokens ({results['method']} method), supervised fraction "
          f"{results['supervised_fraction']}; load {results['machine']['load_average']}, "
          f"{results['machine']['torch_threads']} threads")
    print(f"{'version':<10}{'tokens':>8}{'seconds':>10}{'peak above start GiB':>22}")
    for kind, s in results["side_by_side"].items():
        print(f"{kind:<10}{t:>8}{s['seconds']:>10.2f}{s['peak_above_start_gib']:>22.3f}")
    print(f"chunked / naive at {t} tokens: memory {results['memory_ratio_chunked_over_naive']:.4f}x, time "
          f"{results['time_ratio_chunked_over_naive']:.3f}x (loss agrees to {results['loss_relative_difference']:.1e})")
    print(f"process CPU time (all threads, best of {results['repeats']}): chunked "
          f"{results['side_by_side']['chunked']['cpu_seconds']:.2f} s, naive "
          f"{results['side_by_side']['naive']['cpu_seconds']:.2f} s: "
          f"{results['cpu_time_ratio_chunked_over_naive']:.3f}x (less sensitive than wall time to other processes)")
    if "full" in results:
        full = results["full"]
        print(f"at {results['full_tokens']} tokens: chunked measured {full['chunked_seconds']:.2f} s, peak +"
              f"{full['chunked_peak_above_start_gib']:.3f} GiB; naive extrapolated (x{results['full_tokens'] / t:g}) "
              f"peak +{full['naive_peak_above_start_gib_extrapolated']:.2f} GiB (its fp32 logits alone "
              f"{full['naive_fp32_logits_gib']:.2f} GiB): memory ratio {full['memory_ratio_chunked_over_naive']:.4f}x")


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, runs, prints and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=77824)
    parser.add_argument("--naive-tokens", type=int, help="size of the side-by-side run (default: the largest fit)")
    parser.add_argument("--vocab", type=int, default=32002)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--method", choices=("auto", "fused", "checkpoint"), default="auto",
                        help="chunked_weighted_cross_entropy's method (auto: fused for the benchmark's nn.Linear)")
    parser.add_argument("--supervised-fraction", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true", help="skip the chunked run at the full size")
    parser.add_argument("--small", action="store_true", help="small sizes: a smoke run of seconds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.small:
        args.tokens, args.vocab, args.hidden, args.chunk_tokens = 2048, 4096, 32, 256
        args.naive_tokens = args.naive_tokens or 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    return print_and_save(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
