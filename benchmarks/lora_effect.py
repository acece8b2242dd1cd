"""Does C-RLFT's ordering hold with LoRA? ``crlft_effect.py``'s comparison, as adapters on a base that knows the task
badly.

The base is the demo's SFT-on-all-data model (``crlft_effect.py``'s ``sft_all`` recipe, full fine-tuning, data seed
0): it has learned the sub-optimal source's bug. Three LoRA runs start from it, each with the same number of
optimizer steps of the same token budget on 2 DeepSpeed ranks and the same schedule:

* ``lora_sft_all``     LoRA SFT on all the data (no conditions, every assistant token weighs 1).
* ``lora_sft_expert``  LoRA SFT on the expert source only.
* ``lora_crlft``       LoRA C-RLFT: conditions GPT4 / GPT3, rewards 1.0 / 0.1.

Every run is ``./launch.sh recipes/demo.yaml`` with overrides (prepare, train, export, ``crlft eval``), scored by greedy
exact match on the 300 held-out prompts under the condition it is used with (none for SFT, GPT4 for C-RLFT). The
seeds change the adapters' initialisation and the data order; the data and the base are the same for all.

    python benchmarks/lora_effect.py --seeds 0 1 2     # writes benchmarks/lora_effect.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crlft_effect import DEMO, ROOT, results_of, run_overrides, run_record, steps_per_epoch, summarize  # noqa: E402 (the same runs, as adapters)

METHODS = {"lora_sft_all": "sft_all", "lora_sft_expert": "sft_expert", "lora_crlft": "crlft"}
DATA_SEED = 0


def lora_overrides(method: str, seed: int, work_dir: str, base: str, epochs: int, steps: int, lr: float,
                   rank: int) -> list[str]:
    """``crlft_effect``'s overrides for ``method`` on data seed 0, turned into a LoRA run from ``base``."""
    run = os.path.join(work_dir, f"{method}_s{seed}")
    return run_overrides(METHODS[method], DATA_SEED, work_dir, epochs, steps) + [
        f"model.base={base}", "model.create_if_missing=null",
        f"model.lora.r={rank}", f"model.lora.alpha={2 * rank}", "model.lora.dropout=0.0",
        f"train.output_dir={run}", f"data.output_dir={os.path.join(run, 'prepared')}",
        f"train.seed={seed}", f"train.lr={lr}", "train.weight_decay=0.0",
    ]


def launch(overrides: list[str], log_path: str, env: dict[str, str]) -> float:
    """Prepare is done; train, export and evaluate through launch.sh. Returns the seconds it took."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run([os.path.join(ROOT, "launch.sh"), DEMO, *overrides], cwd=ROOT, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def prepare_and_size(overrides_for, steps: int, env: dict[str, str]) -> int:
    """Prepare a run's data (epochs=1 probe) and return the epochs that span ``steps`` optimizer steps."""
    probe = overrides_for(1)
    subprocess.run([sys.executable, "-m", "crlft", "prepare", DEMO, *probe], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return math.ceil(steps / steps_per_epoch(probe))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-steps", type=int, default=150, help="full fine-tuning steps of the SFT-all base")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every LoRA run (equal compute)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of the LoRA runs")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = 2r)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "lora_effect"))
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "lora_effect.json"))
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    started = time.perf_counter()

    # The base: SFT on all data, full fine-tuning (crlft_effect's sft_all run, shorter).
    base_run = os.path.join(args.work_dir, f"sft_all_s{DATA_SEED}")
    def base_overrides(epochs):
        return run_overrides("sft_all", DATA_SEED, args.work_dir, epochs, args.base_steps) + [
            'eval.conditions=["", GPT4, GPT3]']
    epochs = prepare_and_size(base_overrides, args.base_steps, env)
    seconds = launch(base_overrides(epochs), base_run + ".log", env)
    results, metrics = results_of(base_run)
    base = {"steps": len(metrics), "seconds": round(seconds, 1),
            "accuracy_by_condition": {c: r["accuracy"] for c, r in results.items()}}
    print(f"base (full SFT on all data): {len(metrics)} steps, accuracy {results['']['accuracy']:.1%} with no "
          f"condition, {seconds:.0f} s", flush=True)
    base_export = os.path.join(base_run, "export", "final")

    runs = []
    for seed in args.seeds:
        for method in METHODS:
            def overrides_for(epochs, method=method, seed=seed):
                return lora_overrides(method, seed, args.work_dir, base_export, epochs, args.steps, args.lr,
                                      args.rank)
            epochs = prepare_and_size(overrides_for, args.steps, env)
            run_dir = os.path.join(args.work_dir, f"{method}_s{seed}")
            seconds = launch(overrides_for(epochs), run_dir + ".log", env)
            condition = "GPT4" if method == "lora_crlft" else ""
            runs.append(run_record(method, seed, epochs, run_dir, condition, seconds))
            print(f"{method:<16} seed {seed}: {runs[-1]['steps']} steps, {runs[-1]['tokens']:,} tokens, accuracy "
                  f"{runs[-1]['accuracy']:.1%} under {condition!r}, {seconds:.0f} s", flush=True)

    summary = summarize(runs, METHODS)
    total = time.perf_counter() - started
    print(f"\nLoRA (r={args.rank}) from a full-SFT-on-all-data base, {len(args.seeds)} seeds, {args.steps} steps each, "
          f"greedy exact match on 300 held-out prompts ({total:.0f} s in all)")
    print(f"{'method':<16} {'accuracy (mean ± std)':>22} {'per seed':>24} {'tokens/run':>12}")
    print(f"{'base':<16} {base['accuracy_by_condition']['']:>13.1%} {'':>32}")
    for method, s in summary.items():
        per_seed = " ".join(f"{a:.1%}" for a in s["accuracies"])
        print(f"{method:<16} {s['mean']:>13.1%} ± {s['std']:<6.1%} {per_seed:>24} {s['tokens_per_run']:>12,.0f}")
    with open(args.json, "w") as f:
        json.dump({"base": base, "summary": summary, "runs": runs, "steps": args.steps, "base_steps": args.base_steps,
                   "lr": args.lr, "rank": args.rank, "seeds": args.seeds, "seconds": round(total, 1)}, f, indent=2)
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
