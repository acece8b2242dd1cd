"""Cost of validation: one evaluation of the held-out split against one training step over the same tokens, in one run.

Both sides are crlft's own code on one DeepSpeed ZeRO-2 engine (a world of one, in this process): the training side
is ``crlft.trainer.train_step`` on a packed row of ``--row-tokens`` tokens (forward, fused chunked loss with its
gradients, backward, AdamW update, the metrics' all-reduce); the evaluation side is
``crlft.evaluation.Evaluator.evaluate`` on a held-out split made of *the same conversations* (packed by the same
planner, forward only under ``torch.no_grad()``, the fused loss without gradient work, one all-reduce). The model is
a randomly initialised Mistral with the real 32,002-token vocabulary (the lm_head and its loss are a large part of
a small model's step). The two alternate, training step then evaluation, so load from other processes hits both
alike; the first pair is a warm-up and is not timed. Reported: seconds per token of each and their ratio (goal
≤ 0.5: an evaluation costs at most half a training step over as many tokens).

Conversation lengths are log-normal as in ``benchmarks/bench_train.py`` (``--length-scale`` 1/8 by default).

Run: ``python benchmarks/bench_eval.py`` (about a minute on 2 cores); ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_train.py
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import lognormal_lengths, machine_summary  # noqa: E402


def make_dataset(num_tokens: int, scale: float, vocab: int, seed: int):
    """A prepared-style dataset of about ``num_tokens`` tokens (prompt 20-60% weight 0, the answer weight 1)."""
    import datasets

    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(int(num_tokens / (np.exp(7.0) * scale)) + 8, rng, scale)
    lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), num_tokens)))]
    rows = {"input_ids": [], "loss_weights": [], "length": [], "source": [], "index": [], "condition": []}
    for i, n in enumerate(lengths.tolist()):
        prompt = int(n * rng.uniform(0.2, 0.6))
        rows["input_ids"].append(rng.integers(0, vocab, n).astype(np.int32).tolist())
        rows["loss_weights"].append([0.0] * prompt + [1.0 if i % 3 else 0.1] * (n - prompt))
        rows["length"].append(n)
        rows["source"].append("expert" if i % 3 else "suboptimal")
        rows["index"].append(i)
        rows["condition"].append("GPT4" if i % 3 else "GPT3")
    return datasets.Dataset.from_dict(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row-tokens", type=int, default=4096, help="tokens per packed row (batch_max_len)")
    parser.add_argument("--length-scale", type=float, default=1 / 8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6, help="timed pairs (after one warm-up pair)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    import deepspeed
    from transformers import MistralConfig, MistralForCausalLM

    from crlft.attention import choose_attn_implementation
    from crlft.dist import init_distributed
    from crlft.evaluation import Evaluator
    from crlft.loader import PackedLoader
    from crlft.loss import WeightedLossModel
    from crlft.trainer import train_step

    dist = init_distributed()
    vocab = 32002
    dataset = make_dataset(args.row_tokens * (args.repeats + 2), args.length_scale, vocab, seed=0)
    loader = PackedLoader(dataset, max_tokens=args.row_tokens, num_ranks=1, seed=0, num_epochs=1)
    steps = iter(loader)

    torch.manual_seed(0)
    attn = choose_attn_implementation("auto", dist.device, torch.float32)
    config = MistralConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                           num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=8192,
                           attn_implementation=attn, tie_word_embeddings=False)
    model = MistralForCausalLM(config)
    wrapped = WeightedLossModel(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
                 "bf16": {"enabled": False}, "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=ds_config)
    engine.train()

    train_s, train_tokens, eval_s, eval_tokens, eval_rows = [], [], [], [], []
    for k in range(args.repeats + 1):
        step = next(steps)
        held_out = dataset.select(step.micro_batches[0]["conversation_indices"].tolist())
        evaluator = Evaluator(held_out, max_tokens=args.row_tokens, world_size=1, rank=0, pad_to_multiple_of=64,
                              pad_token_id=0, every_steps=None)
        started = time.perf_counter()
        train_step(engine, step, world_size=1, grad_accum=1, loss_normalization="weight_sum",
                   conditions=["GPT3", "GPT4"], device=dist.device)
        train_time = time.perf_counter() - started
        started = time.perf_counter()
        metrics = evaluator.evaluate(engine, dist.device)
        eval_time = time.perf_counter() - started
        if k == 0:
            continue  # warm-up pair
        train_s.append(train_time)
        train_tokens.append(step.global_num_tokens)
        eval_s.append(eval_time)
        eval_tokens.append(metrics["eval_num_tokens"])
        eval_rows.append(evaluator.rows_per_rank)
        print(f"pair {k}: training step {train_time:.3f}s for {step.global_num_tokens} tokens, evaluation "
              f"{eval_time:.3f}s for {metrics['eval_num_tokens']} tokens ({evaluator.rows_per_rank} row)", flush=True)

    train_per_token = sum(train_s) / sum(train_tokens)
    eval_per_token = sum(eval_s) / sum(eval_tokens)
    ratios = [(e / et) / (t / tt) for e, et, t, tt in zip(eval_s, eval_tokens, train_s, train_tokens)]
    result = {
        "machine": machine_summary(),
        "settings": {**vars(args), "attention": attn, "parameters": sum(p.numel() for p in model.parameters())},
        "training_step_s": train_s,
        "training_tokens": train_tokens,
        "evaluation_s": eval_s,
        "evaluation_tokens": eval_tokens,
        "evaluation_rows": eval_rows,
        "training_tokens_per_s": 1 / train_per_token,
        "evaluation_tokens_per_s": 1 / eval_per_token,
        "eval_over_train_time_per_token": eval_per_token / train_per_token,
        "eval_over_train_per_pair": {"min": min(ratios), "median": float(np.median(ratios)), "max": max(ratios)},
    }
    print(f"training: {1 / train_per_token:,.0f} tokens/s; evaluation: {1 / eval_per_token:,.0f} tokens/s; one "
          f"evaluation of N tokens takes {eval_per_token / train_per_token:.3f}x a training step over N tokens "
          f"(per pair {min(ratios):.3f}-{max(ratios):.3f}); load {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
