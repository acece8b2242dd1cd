"""Does C-RLFT beat plain SFT on mixed-quality data? The paper's central claim, in miniature, on a CPU.

Three ways to train the same tiny model on the demo's data (``recipes/demo.yaml``: sorting digits, an expert source
that is always right and a 5.7x larger sub-optimal one that is wrong 80% of the time with a systematic bug), with
equal compute (the same optimizer steps of the same token budget, the same schedule, the same seeds):

* ``sft_all``     SFT on all the data: no conditions, every assistant token weighs 1.
* ``sft_expert``  SFT on the expert source only (more epochs over less data, same number of steps).
* ``crlft``       C-RLFT: conditions GPT4 / GPT3 in the role prefixes, rewards 1.0 / 0.1 as loss weights.

Each run is the real path — ``./launch.sh recipes/demo.yaml`` with overrides: generate, prepare, DeepSpeed on
2 CPU ranks, export, ``crlft eval`` — and is scored by greedy exact match on held-out prompts under the condition
it would be used with: none for the SFT baselines (they were trained without one), the expert's (GPT4) for C-RLFT.

    python benchmarks/crlft_effect.py --seeds 0 1 2 --json benchmarks/crlft_effect.json

Prints a table of mean ± std accuracy over the seeds and writes it (with every run's figures) as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone without `pip install -e .`: the runs below get it on PYTHONPATH too
DEMO = os.path.join(ROOT, "recipes", "demo.yaml")
METHODS = ("sft_all", "sft_expert", "crlft")


def run_overrides(method: str, seed: int, work_dir: str, epochs: int, steps: int) -> list[str]:
    """The ``section.key=value`` overrides that turn the demo recipe into one run of the comparison."""
    sources = os.path.join(work_dir, f"data_s{seed}")
    run = os.path.join(work_dir, f"{method}_s{seed}")
    common = [
        f"model.base={os.path.join(work_dir, f'base_s{seed}')}",  # the same random init for every method of a seed
        f"data.generate=python {os.path.join(ROOT, 'data_prep', 'make_mixed_quality.py')} --out {sources} "
        f"--tasks sort --num-conversations 2000 --expert-fraction 0.15 --suboptimal-error-rate 0.8 "
        f"--num-eval 300 --seed {seed}",
        f"data.output_dir={os.path.join(run, 'prepared')}",
        f"data.sources.0.path={os.path.join(sources, 'expert.jsonl')}",
        f"data.sources.1.path={os.path.join(sources, 'suboptimal.jsonl')}",
        f"eval.prompts={os.path.join(sources, 'eval.jsonl')}",
        f"train.output_dir={run}",
        f"train.seed={seed}",
        f"train.epochs={epochs}",
        # Stop after `steps` with the schedule over all epochs, as the recorded figures were run (train.max_steps
        # would make the schedule span exactly `steps`).
        f"train.stop_after_steps={steps}",
        "train.save_every_steps=null",
        "logging.log_every=100",
    ]
    if method == "crlft":
        return common + ["eval.conditions=[GPT4, GPT3]"]
    if method == "sft_all":
        return common + ['data.sources.0.condition=""', 'data.sources.1.condition=""', "data.sources.1.reward=1.0",
                         'eval.conditions=[""]']
    if method == "sft_expert":
        expert = os.path.join(sources, "expert.jsonl")
        return common + [
            f'data.sources=[{{name: expert, path: {expert}, format: sharegpt, condition: "", reward: 1.0}}]',
            'eval.conditions=[""]']
    raise ValueError(method)


def steps_per_epoch(recipe_overrides: list[str]) -> int:
    """Optimizer steps of one epoch of a prepared run on launch.sh's 2 CPU ranks (what `crlft plan` reports)."""
    from crlft.plan import data_plan
    from crlft.recipe import load_recipe

    plan = data_plan(load_recipe(DEMO, recipe_overrides), num_gpus=2)
    if not plan.prepared:
        raise RuntimeError(f"the run's dataset is not prepared: {plan.message}")
    return plan.steps_per_epoch


def results_of(run_dir: str) -> tuple[dict, list[dict]]:
    """A finished run's ``crlft eval`` results and its ``metrics.jsonl`` records."""
    with open(os.path.join(run_dir, "eval.json")) as f:
        results = json.load(f)["results"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return results, metrics


def run_record(method: str, seed: int, epochs: int, run_dir: str, condition: str, seconds: float) -> dict:
    """One row of the benchmark's JSON: the run's steps, tokens, final loss and accuracy under ``condition``."""
    results, metrics = results_of(run_dir)
    return {
        "method": method, "seed": seed, "epochs": epochs, "steps": len(metrics),
        "tokens": sum(m["num_tokens"] for m in metrics), "final_loss": metrics[-1]["loss"],
        "eval_condition": condition, "accuracy": results[condition]["accuracy"],
        "accuracy_by_condition": {c: r["accuracy"] for c, r in results.items()}, "seconds": round(seconds, 1),
    }


def summarize(runs: list[dict], methods) -> dict:
    """Per method: mean and std of the accuracy over its runs (seeds), the accuracies, tokens and steps per run."""
    summary = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        accuracies = [r["accuracy"] for r in mine]
        summary[method] = {
            "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies,
            "tokens_per_run": statistics.mean(r["tokens"] for r in mine),
            "steps_per_run": statistics.mean(r["steps"] for r in mine),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=690, help="optimizer steps of every run (equal compute)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "crlft_effect"))
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "crlft_effect.json"))
    args = parser.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    runs = []
    started = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            # Prepare first, to size the epochs so that every method's schedule spans the same number of steps.
            probe = run_overrides(method, seed, args.work_dir, epochs=1, steps=args.steps)
            subprocess.run([sys.executable, "-m", "crlft", "prepare", DEMO, *probe], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            epochs = math.ceil(args.steps / steps_per_epoch(probe))
            overrides = run_overrides(method, seed, args.work_dir, epochs, args.steps)
            t0 = time.perf_counter()
            log_path = os.path.join(args.work_dir, f"{method}_s{seed}.log")
            with open(log_path, "w") as log:
                subprocess.run([os.path.join(ROOT, "launch.sh"), DEMO, *overrides], cwd=ROOT, env=env, check=True,
                               stdout=log, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - t0
            run_dir = os.path.join(args.work_dir, f"{method}_s{seed}")
            runs.append(run_record(method, seed, epochs, run_dir, "GPT4" if method == "crlft" else "", seconds))
            condition = runs[-1]["eval_condition"]
            print(f"{method:<11} seed {seed}: {runs[-1]['steps']} steps, {runs[-1]['tokens']:,} tokens, "
                  f"accuracy {runs[-1]['accuracy']:.1%} under {condition!r}, {seconds:.0f} s", flush=True)

    summary = summarize(runs, args.methods)
    print(f"\nC-RLFT vs SFT, {len(args.seeds)} seeds, {args.steps} steps each, greedy exact match on 300 held-out "
          f"prompts ({time.perf_counter() - started:.0f} s in all)")
    print(f"{'method':<12} {'accuracy (mean ± std)':>22} {'per seed':>24} {'tokens/run':>12}")
    for method, s in summary.items():
        per_seed = " ".join(f"{a:.1%}" for a in s["accuracies"])
        print(f"{method:<12} {s['mean']:>13.1%} ± {s['std']:<6.1%} {per_seed:>24} {s['tokens_per_run']:>12,.0f}")
    with open(args.json, "w") as f:
        json.dump({"summary": summary, "runs": runs, "steps": args.steps, "seeds": args.seeds}, f, indent=2)
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
