"""Training-step throughput: crlft's packed, padding-free step against a conventional padded step, in one run.

Both sides train the same randomly initialised Mistral on the same conversations with the same AdamW (and
gradient clipping); they differ only in how a batch is formed and computed:

* **packed** (crlft): ``crlft.loader.PackedLoader`` packs the conversations into rows of ``row_tokens`` tokens
  (``plan_epoch`` + ``pack_row``); the model runs with the attention ``crlft.attention.choose_attn_implementation
  ("auto", ...)`` picks (on CPU: ``crlft_varlen``, one SDPA call per conversation, no mask) and the loss is
  ``crlft.loss.causal_lm_loss_parts`` (chunked weighted cross-entropy over the supervised positions only). One
  optimizer step per packed row.
* **padded** (what Hugging Face ``Trainer`` with ``DataCollatorWithPadding``-style pad-to-longest does): the
  conversations of that same packed row, in random order, in batches of ``--pad-batch-size``, right-padded to
  the longest of the batch with an ``attention_mask``; ``sdpa`` attention; full ``[B, L, vocab]`` logits and a
  weighted cross-entropy on them. One optimizer step per batch.
* optionally (``--dense-sdpa``) **packed-sdpa**: the packed row with transformers' own ``sdpa`` (a dense
  ``[T, T]`` block-diagonal mask) and the same chunked loss: shows what the attention choice is worth.

The steps are interleaved row by row (packed, then padded on the same conversations, ...), so load from other
processes hits both sides alike; the first row of each side is a warm-up and is not timed. Useful tokens are
real conversation tokens (no padding), identical on both sides. Peak memory is the process's peak resident set
size (sampled every 5 ms) while a side runs, and that peak minus the resident size before the side's step
(model, optimizer state and data already resident); freed heap is returned to the OS (``malloc_trim``) before
every step so one side's leftovers do not count against the other.

Conversation lengths are log-normal (mu=6.5, sigma=1.0, clipped to [16, 8192]) as in
``benchmarks/bench_packing.py``, multiplied by ``--length-scale`` (default 1/8: [2, 1024] tokens, mean ~137)
together with the row size (77,824 x 1/8 = 9,728 tokens) so that a CPU run takes minutes. Loss weights: each
conversation's first 20-60% (uniform) is prompt with weight 0, the rest weight 1.

Run: ``python benchmarks/bench_train.py`` (a few minutes on 2 cores); ``--small`` for a seconds-long smoke run;
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import sys
import threading
import time
from contextlib import contextmanager

# Before torch starts OpenMP: on a shared CPU, threads that spin while waiting take the cores the other
# processes need and make every small op slow; PASSIVE makes them sleep (set OMP_WAIT_POLICY to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from crlft.attention import choose_attn_implementation, packed_attention_kwargs  # noqa: E402
from crlft.collate import IGNORE_INDEX  # noqa: E402
from crlft.loader import PackedLoader  # noqa: E402
from crlft.loss import causal_lm_loss_parts  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Shared by the benchmarks: machine description and peak memory
# ----------------------------------------------------------------------------------------------------------------


def machine_summary() -> dict:
    """CPU/GPU, thread count, load and library versions, for the results file."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def release_freed_memory() -> None:
    """Return freed heap to the OS so the next resident-size peak belongs to what runs next."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks then include reusable freed heap
        pass


def current_rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set size in a background thread; ``measure(name)`` attributes peaks."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self.above_start: dict[str, int] = {}
        self._phase: str | None = None
        self._start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            phase, rss = self._phase, current_rss_bytes()
            if phase is not None:
                self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
                self.above_start[phase] = max(self.above_start.get(phase, 0), rss - self._start)
            time.sleep(self.interval_s)

    @contextmanager
    def measure(self, phase: str):
        """Attribute the resident size sampled inside the block to ``phase``."""
        release_freed_memory()
        self._start = current_rss_bytes()
        self._phase = phase
        try:
            yield
        finally:
            rss = current_rss_bytes()  # the last moment of the phase, in case no sample fell into it
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            self.above_start[phase] = max(self.above_start.get(phase, 0), rss - self._start)
            self._phase = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def lognormal_lengths(num: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Log-normal(mu=6.5, sigma=1.0) lengths clipped to [16, 8192], all multiplied by ``scale`` (at least 2)."""
    lengths = np.clip(rng.lognormal(6.5, 1.0, num), 16, 8192) * scale
    return np.maximum(2, np.round(lengths)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def make_conversations(num_tokens: int, scale: float, vocab: int, seed: int):
    """Random conversations of about ``num_tokens`` tokens in all: (input_ids list, loss_weights list)."""
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(int(num_tokens / (np.exp(6.5 + 0.5) * scale)) + 8, rng, scale)
    lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), num_tokens)))]
    ids, weights = [], []
    for n in lengths.tolist():
        ids.append(rng.integers(0, vocab, n).tolist())
        prompt = int(n * rng.uniform(0.2, 0.6))
        weights.append([0.0] * prompt + [1.0] * (n - prompt))
    return ids, weights


def padded_batches(conversations: list[tuple[list[int], list[float]]], batch_size: int, rng: random.Random):
    """Pad-to-longest batches as a padding collator makes them from randomly sampled conversations."""
    order = list(range(len(conversations)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [conversations[i] for i in order[start : start + batch_size]]
        longest = max(len(ids) for ids, _ in chosen)
        input_ids = torch.zeros(len(chosen), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(chosen), longest, dtype=torch.long)
        weights = torch.zeros(len(chosen), longest)
        for b, (ids, w) in enumerate(chosen):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            weights[b, : len(w)] = torch.tensor(w)
        batches.append((input_ids, attention_mask, weights))
    return batches


def padded_step(model, optimizer, input_ids, attention_mask, weights, grad_clip: float) -> int:
    """One conventional step: full logits, weighted CE on them (shifted), backward, clip, AdamW. Returns tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    target_weights = weights[:, 1:] * attention_mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none", ignore_index=IGNORE_INDEX)
    loss = (ce * target_weights.reshape(-1)).sum() / target_weights.sum().clamp(min=1e-6)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(attention_mask.sum())


def packed_step(model, optimizer, row, attn: str, grad_clip: float) -> int:
    """One crlft step on one packed row: decoder, chunked weighted CE, backward, clip, AdamW. Returns tokens."""
    parts = causal_lm_loss_parts(model, row, **packed_attention_kwargs(row, attn))
    loss = parts.weighted_ce_sum / parts.weights.sum().clamp(min=1e-6)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(row["num_tokens"])


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark; returns the figures."""
    from datasets import Dataset
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(args.seed)
    row_tokens = int(round(args.full_row_tokens * args.length_scale / 64)) * 64
    ids, weights = make_conversations(args.rows * row_tokens, args.length_scale, args.vocab, args.seed)
    conversations = list(zip(ids, weights))
    dataset = Dataset.from_dict({"input_ids": ids, "loss_weights": weights})
    rows = [step.micro_batches[0] for step in
            PackedLoader(dataset, max_tokens=row_tokens, seed=args.seed, pad_to_multiple_of=64)]
    batches = padded_batches(conversations, args.pad_batch_size, random.Random(args.seed))

    config = MistralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=8192,
        sliding_window=None, tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config).float().train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    log_lines: list[str] = []
    attn = choose_attn_implementation("auto", "cpu", torch.float32, log=log_lines.append)
    print(log_lines[0], flush=True)
    print(f"{len(conversations)} conversations, {sum(map(len, ids))} tokens: {len(rows)} packed rows of "
          f"{row_tokens}, {len(batches)} padded batches of {args.pad_batch_size}", flush=True)

    sides = ["packed", "padded"] + (["packed-sdpa"] if args.dense_sdpa else [])
    seconds = dict.fromkeys(sides, 0.0)
    useful = dict.fromkeys(sides, 0)
    computed = dict.fromkeys(sides, 0)  # positions run through the model, padding included
    optimizer_steps = dict.fromkeys(sides, 0)
    memory = PeakRSS()

    def step(side: str, item, timed: bool) -> None:
        with memory.measure(side):
            started = time.perf_counter()
            if side == "padded":
                model.set_attn_implementation("sdpa")
                tokens, positions = padded_step(model, optimizer, *item, args.grad_clip), item[0].numel()
            else:
                name = attn if side == "packed" else "sdpa"
                model.set_attn_implementation(name)
                tokens, positions = packed_step(model, optimizer, item, name, args.grad_clip), item["input_ids"].numel()
            elapsed = time.perf_counter() - started
        if timed:
            seconds[side] += elapsed
            useful[side] += tokens
            computed[side] += positions
            optimizer_steps[side] += 1

    # Warm-up (untimed): one packed row per packed side and a few padded batches.
    for side in sides:
        for item in ([rows[0]] if side != "padded" else batches[:4]):
            step(side, item, timed=False)
    memory.peaks.clear()
    memory.above_start.clear()

    # Timed: every row and every batch once, interleaved so both sides have done about the same useful tokens
    # at any moment (load from other processes then hits both alike).
    load_before = os.getloadavg()
    started = time.perf_counter()
    next_row = next_batch = 0
    while next_row < len(rows) or next_batch < len(batches):
        if next_row < len(rows) and (next_batch == len(batches) or useful["packed"] <= useful["padded"]):
            for side in sides:
                if side != "padded":
                    step(side, rows[next_row], timed=True)
            next_row += 1
            print(f"row {next_row}/{len(rows)}: " + ", ".join(
                f"{side} {useful[side]} tokens in {seconds[side]:.1f} s" for side in sides), flush=True)
        else:
            step("padded", batches[next_batch], timed=True)
            next_batch += 1
    memory.close()
    total_s = time.perf_counter() - started
    assert useful["packed"] == useful["padded"] == sum(map(len, ids)), "both sides train on every conversation"

    results = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_summary(),
        "load_average_before": [round(x, 2) for x in load_before],
        "attention": log_lines[0],
        "model": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "vocab": args.vocab, "params": num_params, "dtype": "float32"},
        "length_scale": args.length_scale,
        "row_tokens": row_tokens,
        "pad_batch_size": args.pad_batch_size,
        "num_conversations": len(conversations),
        "packed_rows": len(rows),
        "wall_s": round(total_s, 1),
        "sides": {},
    }
    for side in sides:
        results["sides"][side] = {
            "useful_tokens": useful[side],
            "computed_tokens": computed[side],
            "padding_fraction": 1 - useful[side] / computed[side] if computed[side] else 0.0,
            "optimizer_steps": optimizer_steps[side],
            "seconds": seconds[side],
            "useful_tokens_per_s": useful[side] / seconds[side] if seconds[side] else 0.0,
            "peak_rss_gib": memory.peaks.get(side, 0) / 2**30,
            "peak_above_start_gib": memory.above_start.get(side, 0) / 2**30,
        }
    packed, padded = results["sides"]["packed"], results["sides"]["padded"]
    results["speedup_packed_over_padded"] = (
        packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"] if padded["useful_tokens_per_s"] else 0.0
    )
    if args.dense_sdpa:
        dense = results["sides"]["packed-sdpa"]
        results["speedup_varlen_over_dense_sdpa"] = (
            packed["useful_tokens_per_s"] / dense["useful_tokens_per_s"] if dense["useful_tokens_per_s"] else 0.0
        )
    return results


def print_table(results: dict) -> None:
    """The human-readable summary."""
    print()
    print(f"{results['attention']}")
    print(f"model {results['model']}, rows of {results['row_tokens']} tokens (length scale "
          f"{results['length_scale']}), {results['num_conversations']} conversations in {results['packed_rows']} rows, "
          f"padded batch size {results['pad_batch_size']}, load average before {results['load_average_before']}, "
          f"after {results['machine']['load_average']}")
    header = (f"{'side':<12}{'useful tok':>11}{'computed':>10}{'pad %':>7}{'opt steps':>10}{'seconds':>9}"
              f"{'useful tok/s':>13}{'peak RSS GiB':>13}{'peak - start':>13}")
    print(header)
    print("-" * len(header))
    for side, s in results["sides"].items():
        print(f"{side:<12}{s['useful_tokens']:>11}{s['computed_tokens']:>10}{100 * s['padding_fraction']:>7.1f}"
              f"{s['optimizer_steps']:>10}{s['seconds']:>9.2f}{s['useful_tokens_per_s']:>13.1f}"
              f"{s['peak_rss_gib']:>13.2f}{s['peak_above_start_gib']:>13.2f}")
    print(f"speed-up packed / padded (useful tokens/s): {results['speedup_packed_over_padded']:.2f}x")
    if "speedup_varlen_over_dense_sdpa" in results:
        print(f"speed-up crlft_varlen / dense-mask sdpa on the same packed rows: "
              f"{results['speedup_varlen_over_dense_sdpa']:.2f}x")


def print_and_save(results: dict, print_table, json_path: str | None) -> dict:
    """Print a benchmark's table, write its figures to ``json_path`` when given, and return them."""
    print_table(results)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, runs, prints and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5, help="rows' worth of conversations to train on")
    parser.add_argument("--length-scale", type=float, default=1 / 8)
    parser.add_argument("--full-row-tokens", type=int, default=77824, help="row size before --length-scale")
    parser.add_argument("--pad-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32002)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dense-sdpa", action="store_true", help="also time packed rows with a dense sdpa mask")
    parser.add_argument("--small", action="store_true", help="tiny model and rows: a smoke run of seconds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.length_scale, args.hidden, args.ffn, args.layers = 2, 1 / 64, 32, 64, 1
        args.heads, args.kv_heads, args.vocab = 4, 2, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    return print_and_save(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
