"""Host memory per CPU rank: ZeRO-3 loading (partitioned vs a full copy), and ``crlft plan``'s memory per rank
against the measured peak while training.

``load``: a random Mistral of ``--layers`` x ``--hidden`` (default 12 x 1024, vocabulary 32,000 + the two OpenChat
tokens: 248M parameters, bf16 safetensors) is loaded by ``crlft.model.load_model`` (a) the way ZeRO-2 does, one
full copy (``from_pretrained``) on one rank, (b) partitioned (ZeRO-3) on one rank, (c) partitioned on two ranks.
Each rank resets its peak resident set (``/proc/self/clear_refs``, 5) just before loading and reads ``VmHWM`` and
``VmRSS`` of ``/proc/self/status`` right after: the peak while loading, absolute and above the resident size
before loading (interpreter, torch, DeepSpeed, transformers, the tokenizer: the same for every configuration).

``train``: the same model trained for 2 steps by ``deepspeed --module crlft.train`` on CPU ranks (ZeRO-2 and
ZeRO-3, 1 and 2 ranks, fp32 unless ``--train-dtype bfloat16``: most CPUs emulate bf16 matmuls, minutes per step;
``batch_max_len`` 512, gradient checkpointing off); every 50 ms the benchmark reads each rank's ``VmHWM`` from
``/proc/PID/status`` and records it when step 2 is logged (before any checkpoint or export). Measured = that peak -
the rank's resident size before loading (its log line); planned = ``crlft.memory.memory_per_gpu`` (weights +
gradients + optimizer state + buffers + activations) for the run.

Run: ``python benchmarks/bench_memory.py load --json load.json`` and ``... train --json train.json`` (minutes on
2 cores; ``train`` needs about 4 GB free per rank). ``load --repeats 3`` measures each configuration three times
(the heap's reuse of freed blocks varies a little between runs); the ratios it prints take the worst 2-rank run
against the best 1-rank one. ``--layers 32 --hidden 2048`` is a 2.1B model (4 GB of bf16 weights).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2**30


def make_base(out_dir: str, layers: int, hidden: int) -> str:
    """A random Mistral (Mistral's 32,000 rows) with the OpenChat 3.5 tokenizer, bf16 safetensors."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from crlft.tokenizer import build_tokenizer

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tokenizer = build_tokenizer("openchat_3.5", out_dir)
    config = MistralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1), head_dim=64,
                           max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


def write_recipe(work: str, base: str, zero_stage: int, dtype: str = "bfloat16") -> str:
    """A recipe for ``base`` (trained in ``dtype``) on a few synthetic ShareGPT conversations."""
    data = os.path.join(work, "conversations.jsonl")
    if not os.path.isfile(data):
        with open(data, "w", encoding="utf-8") as f:
            for i in range(64):
                words = " ".join(["red green blue cat dog bird"] * (3 + i % 5))
                f.write(json.dumps({"conversations": [{"from": "human", "value": f"Repeat {i}: {words}"},
                                                      {"from": "gpt", "value": f"You said {words}."}]}) + "\n")
    path = os.path.join(work, f"recipe_zero{zero_stage}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""model:
  base: {base}
  template: openchat_3.5
  max_context: 512
  dtype: {dtype}
data:
  output_dir: {work}/data
  num_proc: 1
  sources:
    - {{name: gpt4, path: {data}, format: sharegpt, condition: GPT4 Correct, reward: 1.0}}
deepspeed:
  zero_stage: {zero_stage}
train:
  output_dir: {work}/run_zero{zero_stage}
  epochs: 1
  batch_max_len: 512
  lr: 1.0e-5
  resume: "off"
""")
    return path


# --------------------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------------------


def _status(pid: str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _load_worker(rank: int, world_size: int, port: int, recipe_path: str, partitioned: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from crlft.config import deepspeed_config
    from crlft.model import load_model
    from crlft.recipe import load_recipe
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import load_tokenizer
    from crlft.zero3_load import is_partitioned

    deepspeed.init_distributed(dist_backend="gloo")
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.base, TEMPLATES[recipe.model.template])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status()["VmRSS"]
    started = time.perf_counter()
    model = load_model(recipe, tokenizer, "cpu", ds_config=deepspeed_config(recipe) if partitioned else None)
    seconds = time.perf_counter() - started
    after = _status()
    held = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in model.parameters())
    with open(os.path.join(out_dir, f"load_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "rss_before": before, "peak": after["VmHWM"], "rss_after": after["VmRSS"],
                   "params_held": held, "seconds": seconds}, f)


def measure_load(recipe_zero3: str, ranks: int, partitioned: bool) -> list[dict]:
    import torch.multiprocessing as mp

    from crlft.dist import free_port

    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_load_worker, args=(ranks, free_port(), recipe_zero3, partitioned, out), nprocs=ranks,
                           start_method="spawn", join=True)
        return [json.load(open(os.path.join(out, f"load_rank{r}.json"))) for r in range(ranks)]


def run_load(args) -> dict:
    base = make_base(os.path.join(args.work, "base"), args.layers, args.hidden)
    recipe = write_recipe(args.work, base, 3)
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for name, ranks, partitioned in (("full copy, 1 rank", 1, False), ("ZeRO-3 partitioned, 1 rank", 1, True),
                                         ("ZeRO-3 partitioned, 2 ranks", 2, True)):
            for r in measure_load(recipe, ranks, partitioned):
                r["repeat"] = repeat
                results.setdefault(name, []).append(r)
                print(f"{name} (run {repeat + 1}): rank {r['rank']}: peak {r['peak'] / GIB:.3f} GiB, above the "
                      f"{r['rss_before'] / GIB:.3f} GiB before loading: {(r['peak'] - r['rss_before']) / GIB:.3f} GiB; "
                      f"holds {r['params_held'] / 1e6:.1f}M parameters; {r['seconds']:.1f} s", flush=True)
    # Each 2-rank figure against one rank loading alone (ZeRO-3, the same loader), worst over the runs.
    alone = results["ZeRO-3 partitioned, 1 rank"]
    alone_above = min(r["peak"] - r["rss_before"] for r in alone)
    alone_peak = min(r["peak"] for r in alone)
    for rank in range(2):
        runs = [r for r in results["ZeRO-3 partitioned, 2 ranks"] if r["rank"] == rank]
        above = max(r["peak"] - r["rss_before"] for r in runs) / alone_above
        absolute = max(r["peak"] for r in runs) / alone_peak
        print(f"ZeRO-3, rank {rank} of 2 vs one rank alone (worst of {len(runs)} runs against the lowest alone): "
              f"{above:.2f}x above the pre-loading baseline, {absolute:.2f}x in absolute peak", flush=True)
    return results


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------

_BEFORE = re.compile(r"memory after loading, rank (\d+) .*before loading ([0-9.]+) GiB")


def measure_train(recipe: str, ranks: int, steps: int = 2) -> dict:
    """Each rank's VmHWM when step ``steps`` is logged, and its resident size before loading (from its log)."""
    import psutil

    from crlft.dist import free_port
    from crlft.recipe import load_recipe

    out = load_recipe(recipe).train.output_dir
    metrics = os.path.join(out, "metrics.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(2 // ranks, 1)), DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "crlft.train", recipe,
           f"train.stop_after_steps={steps + 1}"]
    log_path = out + ".log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, int] = {}
    try:
        while process.poll() is None:
            done = os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= steps
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    cmdline = child.cmdline()
                    if "crlft.train" in cmdline and any(a.startswith("--local_rank=") for a in cmdline):
                        rank = int(next(a for a in cmdline if a.startswith("--local_rank=")).split("=")[1])
                        peaks[rank] = _status(str(child.pid))["VmHWM"]
                except (psutil.Error, OSError, StopIteration):
                    continue
            if done:
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        process.wait()
    text = open(log_path, encoding="utf-8", errors="replace").read()
    before = {int(m.group(1)): float(m.group(2)) * GIB for m in _BEFORE.finditer(text)}
    if len(before) != ranks or len(peaks) != ranks:
        raise RuntimeError(f"run did not report every rank:\n{text[-3000:]}")
    return {"peak": peaks, "rss_before": before}


def planned(recipe_path: str, ranks: int) -> dict:
    from transformers import AutoConfig

    from crlft.config import deepspeed_config
    from crlft.memory import activation_bytes, memory_per_gpu
    from crlft.plan import count_parameters
    from crlft.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    config = AutoConfig.from_pretrained(recipe.model.base)
    config.vocab_size = 32002
    num_params = count_parameters(config)
    bf16 = recipe.model.dtype != "float32"
    acts = activation_bytes(config, recipe.train.batch_max_len, recipe.model.gradient_checkpointing,
                            bytes_per_value=2 if bf16 else 4)
    ds_config = deepspeed_config(recipe)
    stage = recipe.deepspeed.zero_stage
    est = memory_per_gpu(num_params, ranks, stage, acts, ds_config, bf16=bf16)
    # A CPU rank's resident size counts only touched pages: DeepSpeed's buckets are torch.empty, so each counts only
    # as far as gradients (ZeRO-3: gathered weights) fill it; on a GPU the allocator reserves them whole.
    zero = ds_config.get("zero_optimization", {})
    b = 2 if bf16 else 4
    reduce_bucket = min(float(zero.get("reduce_bucket_size", 5e8)), num_params)
    live = min(float(zero.get("stage3_max_live_parameters", 1e9)), num_params) if stage == 3 else 0.0
    # ZeRO-3's reduce_scatter_coalesced writes the bucket's gradients whole into its concatenated copy.
    copy = reduce_bucket if stage == 3 and zero.get("reduce_scatter", True) else 0.0
    buffers_touched = (reduce_bucket + live + copy) * b
    return {"num_params": num_params, "weights": est.weights, "gradients": est.gradients,
            "optimizer": est.optimizer, "buffers": est.buffers, "activations": est.activations, "total": est.total,
            "buffers_touched_on_cpu": buffers_touched, "total_on_cpu": est.total - est.buffers + buffers_touched}


def run_train(args) -> dict:
    from crlft.prepare import prepare
    from crlft.recipe import load_recipe

    base = make_base(os.path.join(args.work, "base"), args.layers, args.hidden)
    results = {}
    for stage in (2, 3):
        recipe = write_recipe(args.work, base, stage, args.train_dtype)
        prepare(load_recipe(recipe), log=lambda _: None)
        for ranks in (1, 2):
            import shutil

            shutil.rmtree(load_recipe(recipe).train.output_dir, ignore_errors=True)
            measured = measure_train(recipe, ranks)
            plan = planned(recipe, ranks)
            name = f"ZeRO-{stage}, {ranks} rank{'s' if ranks > 1 else ''}"
            results[name] = {"plan": plan, "measured": measured}
            for rank in range(ranks):
                used = measured["peak"][rank] - measured["rss_before"][rank]
                print(f"{name}: rank {rank}: plan {plan['total'] / GIB:.2f} GiB (weights {plan['weights'] / GIB:.2f}, "
                      f"gradients {plan['gradients'] / GIB:.2f}, optimizer {plan['optimizer'] / GIB:.2f}, buffers "
                      f"{plan['buffers'] / GIB:.2f}, activations {plan['activations'] / GIB:.2f}); measured "
                      f"{used / GIB:.2f} GiB above {measured['rss_before'][rank] / GIB:.2f} GiB before loading "
                      f"({used / plan['total'] - 1:+.0%}; against the plan with the buckets as a CPU rank touches "
                      f"them, {plan['total_on_cpu'] / GIB:.2f} GiB: {used / plan['total_on_cpu'] - 1:+.0%})",
                      flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["load", "train"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "crlft_bench_memory"))
    parser.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="train: the recipe's dtype (bf16 matmuls are emulated on most CPUs: minutes per step)")
    parser.add_argument("--repeats", type=int, default=1, help="load: measure every configuration this many times")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    results = run_load(args) if args.what == "load" else run_train(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
