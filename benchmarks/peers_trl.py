"""The TRL side of ``bench_peers.py``: one ``SFTTrainer`` run, as a TRL user would set it up, with per-step timing.

Runs inside the TRL environment that ``bench_peers.py`` creates (never the project's): ``python peers_trl.py ...``
or ``accelerate launch ... peers_trl.py ...``. It trains the given local model on the given pre-tokenized
conversations (``input_ids`` + ``assistant_masks``, exactly crlft's tokens and its supervised positions) with
``packing=True`` and TRL's default packing strategy (``bfd``, which turns padding-free on), and writes one JSON
file per rank: every optimizer step's real tokens (all ranks), time and loss, the thread count and peak RSS.

``--check-isolation`` first verifies on TRL's own collator output that a packed row cannot attend across
conversations: ``position_ids`` restart at every packed conversation, there is no attention mask, and the model's
logits on the packed row equal the logits of each conversation alone (and differ when the positions do not
restart, so the check can fail).

Imports nothing from crlft: this is TRL alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_peers.py sets for crlft's ranks

import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory (with its tokenizer)")
    p.add_argument("--data", required=True, help="JSON-lines file of {input_ids, assistant_masks}")
    p.add_argument("--out", required=True, help="output directory; rank r writes trl_rank{r}.json")
    p.add_argument("--row-tokens", type=int, default=2048, help="SFTConfig.max_length: the packed row size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (SFTConfig.max_steps)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-isolation", action="store_true", help="verify the packed rows first (rank 0)")
    return p.parse_args(argv)


def check_isolation(trainer, model, max_rows: int = 2) -> dict:
    """Checks on TRL's own collator output that packed conversations cannot attend to one another.

    Returns:
        What was checked: rows, conversations, the largest logit difference to the conversations run alone, and
        the difference when the positions do not restart (which must be large).

    Raises:
        AssertionError: positions that do not restart per conversation, an attention mask, or packed logits that
            differ from the per-conversation ones.
    """
    dataset = trainer.train_dataset
    # Rows holding several conversations (bfd puts the longest ones first, often alone in their row).
    rows = [i for i, lengths in enumerate(dataset["seq_lengths"]) if len(lengths) > 1][:max_rows]
    worst, leak, conversations = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in rows:
            example = dataset[i]
            lengths = [int(n) for n in example["seq_lengths"]]
            batch = trainer.data_collator([example])
            expected = torch.cat([torch.arange(n) for n in lengths])
            assert "attention_mask" not in batch, "TRL's padding-free collator returned an attention mask"
            assert torch.equal(batch["position_ids"][0, : len(expected)], expected), (
                "position_ids do not restart at every packed conversation"
            )
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
            packed = model(**inputs, use_cache=False).logits[0].float()
            start = 0
            for n in lengths:
                ids = batch["input_ids"][:, start : start + n]
                alone = model(input_ids=ids, use_cache=False).logits[0].float()
                worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
                start += n
            conversations += len(lengths)
            # The same row with positions that do not restart (plain causal attention over the whole row): the
            # later conversations see the earlier ones, so their logits must change, or this check proves nothing.
            t = batch["input_ids"].shape[1]
            causal = model(input_ids=batch["input_ids"], position_ids=torch.arange(t)[None], use_cache=False)
            leak = max(leak, (causal.logits[0, lengths[0] :].float() - packed[lengths[0] :]).abs().max().item())
    model.train()
    assert rows, "no packed row holds more than one conversation"
    assert worst < 1e-3, f"packed logits differ from per-conversation ones by {worst:.3g}"
    assert leak > 100 * max(worst, 1e-6), f"the leak control changed the logits by only {leak:.3g}"
    return {
        "rows": len(rows),
        "conversations": conversations,
        "max_abs_logit_diff": worst,
        "leak_control_max_abs_logit_diff": leak,
        "attn_implementation": model.config._attn_implementation,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rank = int(os.environ.get("RANK", "0"))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # sdpa: on a CPU TRL has no varlen kernel (its padding-free path names FlashAttention 2/3, CUDA only); with
    # position_ids and no mask transformers builds the block-diagonal mask per row (checked by --check-isolation).
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.load_dataset("json", data_files=args.data, split="train")

    config = SFTConfig(
        output_dir=os.path.join(args.out, "trl_output"),
        packing=True,  # packing_strategy left at its default
        max_length=args.row_tokens,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        num_train_epochs=1000,  # max_steps decides
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=args.betas[0],
        adam_beta2=args.betas[1],
        adam_epsilon=args.eps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    assert config.packing_strategy == "bfd", config.packing_strategy

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        """Per optimizer step: real tokens of all ranks (TRL's own count), seconds, and the logged loss."""

        trainer = None

        def on_step_begin(self, args_, state, control, **kwargs):
            self.t0, self.tokens0 = time.perf_counter(), self.trainer._total_train_tokens

        def on_step_end(self, args_, state, control, **kwargs):
            steps.append(
                {
                    "step": state.global_step,
                    "seconds": time.perf_counter() - self.t0,
                    "num_tokens": int(self.trainer._total_train_tokens - self.tokens0),
                }
            )

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps and "loss" not in steps[-1]:
                steps[-1]["loss"] = float(logs["loss"])

    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    timer.trainer = trainer
    set_up_s = time.perf_counter() - started
    isolation = check_isolation(trainer, trainer.model) if args.check_isolation and rank == 0 else None
    trained = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - trained
    row_lengths = [sum(x) for x in trainer.train_dataset["seq_lengths"]]

    result = {
        "side": "trl",
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
        "packing_strategy": config.packing_strategy,
        "padding_free": bool(trainer.padding_free),
        "attn_implementation": trainer.model.config._attn_implementation,
        "packed_rows": len(row_lengths),
        "mean_row_tokens": sum(row_lengths) / max(len(row_lengths), 1),
        "steps": steps,
        "set_up_s": set_up_s,
        "train_s": train_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # kB on Linux
        "isolation": isolation,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"trl_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
