"""crlft vs Hugging Face TRL's ``SFTTrainer``, side by side on the same model, data, rows, optimizer and steps.

What a user would otherwise install to train a chat model with packing on any machine is TRL's ``SFTTrainer``
(axolotl and OpenChat's own trainer need CUDA and flash-attn). Both sides get:

* the same randomly initialised Mistral (one directory, written once by ``crlft.model.create_from_scratch``);
* the same conversations, tokenized once by ``crlft prepare`` (OpenChat 3.5 template, real tokenizer): TRL reads
  the prepared ``input_ids`` with ``assistant_masks = loss_weights > 0``, so both train on exactly the same
  tokens and supervised positions (TRL's pre-tokenized path; its ``assistant_only_loss`` flag needs a chat
  template with ``{% generation %}`` markers and would re-tokenize). Two sets: the demo's short conversations
  (``recipes/demo.yaml``'s generator, ~30 tokens, rewards 1.0 / 0.1) and a long-tailed one (median ~600 tokens,
  truncated at 2,048, one source with reward 1.0, so both losses are the plain token mean);
* rows of 2,048 tokens: crlft ``train.batch_max_len`` and TRL ``max_length`` with ``packing=True`` and its default
  strategy (``bfd``, which makes it padding-free: one flat row, ``position_ids`` restarting per conversation),
  ``per_device_train_batch_size=1``; the same ``grad_accum`` rows per rank per step;
* AdamW (lr, betas 0.9/0.95, eps 1e-5, weight decay 0 so that TRL's no-decay groups cannot differ), gradient
  clipping 1.0, a constant learning rate (so the schedule's length, which ``train.max_steps`` may or may not set,
  does not matter), fp32, the same number of optimizer steps;
* the same threads: 1 process with 2 threads, then 2 processes with 1 thread each (crlft through ``launch.sh``,
  TRL through ``accelerate launch``); ``OMP_WAIT_POLICY=PASSIVE`` for both.

The runs alternate crlft, TRL, crlft, TRL for each setting, so load from other processes hits both alike.
Reported per setting: real tokens per optimizer step (all ranks), the median tokens/s over the timed steps (the
first ``--warmup-steps`` of each run are not timed; a step's time is the optimizer step itself: crlft's
``step_time_s``, TRL's ``on_step_begin`` to ``on_step_end``, both forward/backward of the step's rows, clipping and
the update), the ratio, the peak RSS of each training process (``VmHWM``, read every 0.2 s from /proc), the first
and last loss, and each run's wall time from launch to exit.

Before timing, both sides are checked to keep packed conversations apart: crlft on a row from ``pack_row`` with
its attention backend, TRL on its own collator's output with the backend it trains with (``peers_trl.py
--check-isolation``): positions restart per conversation and packed logits equal each conversation's logits
alone (and change when the positions do not restart, so the check can fail).

TRL is installed by this script into a virtual environment of its own (``--trl-venv``, default ``.venv-trl`` in
the repository, ignored by git) with ``--system-site-packages``, reusing the installed torch, transformers,
accelerate and datasets; the project's environment is never changed. ``--smoke`` runs crlft alone on a tiny
model (no TRL, no timing claims) to keep the script runnable in the test suite.

Run: ``python benchmarks/bench_peers.py --json /tmp/bench/peers.json`` (about 15-20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

TRL_VERSION = "1.16.0"  # the newest TRL on PyPI when written; works with transformers 5.24 and torch 2.13
MODEL = {  # MistralConfig fields of the random base, both sides (19.4M parameters with the 32,002-token vocabulary)
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SMOKE_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
TEMPLATE = "openchat_3.5"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/crlft_bench_peers", help="scratch directory (model, data, runs)")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--datasets", nargs="+", default=["demo", "long"], choices=["demo", "long"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes per run, one setting each")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side per setting, alternated")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps of each run left out of the timing")
    p.add_argument("--row-tokens", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="threads in all: 2 processes get 1 each")
    p.add_argument("--long-conversations", type=int, default=400)
    p.add_argument("--trl-version", default=TRL_VERSION)
    p.add_argument("--trl-venv", default=os.path.join(REPO, ".venv-trl"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds one run may take")
    p.add_argument("--smoke", action="store_true", help="crlft only, tiny model and data, 3 steps (the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.procs, args.repeats, args.steps, args.warmup_steps = ["demo", "long"], [1], 1, 3, 1
        args.row_tokens, args.long_conversations = 256, 24
    if args.warmup_steps >= args.steps:
        p.error("--warmup-steps must be less than --steps")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------------------


def make_base_model(work: str, smoke: bool) -> str:
    """The random Mistral both sides start from (with the OpenChat 3.5 tokenizer), created once."""
    from crlft.model import create_from_scratch

    base = os.path.join(work, "base_model_smoke" if smoke else "base_model")
    if not os.path.isfile(os.path.join(base, "config.json")):
        create_from_scratch(base, SMOKE_MODEL if smoke else MODEL, TEMPLATE, seed=0)
    return base


def demo_sources(work: str, smoke: bool) -> list[dict]:
    """The demo's conversations: ``recipes/demo.yaml``'s own generator command, writing into ``work``."""
    with open(os.path.join(REPO, "recipes", "demo.yaml"), encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    out = os.path.join(work, "sources", "demo_smoke" if smoke else "demo")
    argv = shlex.split(demo["data"]["generate"])
    argv[argv.index("--out") + 1] = out
    if smoke:
        argv[argv.index("--num-conversations") + 1] = "200"
    if not os.path.isfile(os.path.join(out, "suboptimal.jsonl")):
        argv[0] = sys.executable
        argv[1] = os.path.join(REPO, argv[1])
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    sources = []
    for source in demo["data"]["sources"]:
        source = dict(source, path=os.path.join(out, os.path.basename(source["path"])))
        sources.append(source)
    return sources


def long_tailed_conversations(num: int, median_tokens: float, seed: int, tokens_per_word: float) -> list[dict]:
    """ShareGPT records of 1-3 turns whose rendered lengths are log-normal (median ``median_tokens``, sigma 0.7).

    Text is random words of a fixed list; each turn's first 20-50% of words is the user's.
    """
    rng = np.random.default_rng(seed)
    words = np.array(
        (
            "the of and to in is it that for on was with as at by from this have not are but be his "
            "they one all were there can an which their said if will each about how up out them then "
            "she many some so these would other into has more her two like him see time could no make "
            "than first been its who now people my made over did down only way find use may water long "
            "little very after words called just where most know get through back much before go good "
            "new write our used me man too any day same right look think also around another came come "
            "work three word must because does part even place well such here take why things help put "
            "years different away again off went old number great tell men say small every found still "
            "between name should home big give air line set own under read last never us left end along "
            "while might next sound below saw something thought both few those always looked show large "
            "often together asked house world going want school important until form food keep children "
            "feet land side without boy once animals life enough took sometimes four head above kind "
            "began almost live page got earth need far hand high year mother light parts country father "
            "let night following picture being study second eyes soon times story boys since white days "
            "ever paper hard near sentence better best across during today others sure means knew why "
            "upon"
        ).split()
    )
    records = []
    for length in rng.lognormal(math.log(median_tokens), 0.7, size=num):
        turns = int(rng.integers(1, 4))
        messages = []
        for budget in np.full(turns, length / turns):
            n_words = max(2, int((budget - 12) / tokens_per_word))  # ~12 tokens of role prefixes per turn
            n_user = max(1, int(n_words * rng.uniform(0.2, 0.5)))
            text = rng.choice(words, size=n_words)
            messages.append({"from": "human", "value": " ".join(text[:n_user])})
            messages.append({"from": "gpt", "value": " ".join(text[n_user:])})
        records.append({"conversations": messages})
    return records


def long_sources(work: str, num: int, smoke: bool) -> list[dict]:
    """The long-tailed set (written once): one source, condition GPT4, reward 1.0."""
    path = os.path.join(work, "sources", f"long_{num}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # 0.95: what gives a median of ~600 rendered tokens with these words and Mistral's tokenizer (measured).
        records = long_tailed_conversations(num, 100 if smoke else 600, seed=0, tokens_per_word=0.95)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
    return [{"name": "long", "path": path, "format": "sharegpt", "condition": "GPT4", "reward": 1.0}]


def write_recipe(work: str, name: str, base: str, sources: list[dict], args: argparse.Namespace) -> str:
    """The crlft recipe of one data set (train.output_dir and max_steps are set per run on the command line)."""
    recipe = {
        "model": {
            "base": base,
            "template": TEMPLATE,
            "max_context": args.row_tokens,
            "dtype": "float32",
            "attn_implementation": "auto",
            "gradient_checkpointing": False,
        },
        "data": {"sources": sources, "output_dir": os.path.join(work, "prepared", name), "num_proc": 1},
        "train": {
            "output_dir": os.path.join(work, "runs", "unused"),
            "epochs": 1,
            "batch_max_len": args.row_tokens,
            "lr": args.lr,
            "lr_warmup_ratio": 0.0,
            "lr_min_ratio": 1.0,
            "weight_decay": 0.0,
            "betas": [0.9, 0.95],
            "eps": 1e-5,
            "grad_clip": 1.0,
            "grad_accum": args.grad_accum,
            "seed": 0,
            "resume": "off",
            "loss_normalization": "weight_sum",
        },
        "deepspeed": {"zero_stage": 2},
        "logging": {"log_every": 1},
    }
    path = os.path.join(work, f"recipe_{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def prepare_data(recipe_path: str, trl_path: str) -> dict:
    """``crlft prepare`` (reused when up to date), then the same tokens as JSON lines for TRL; the set's figures."""
    from crlft.prepare import load_prepared, prepare
    from crlft.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    prepare(recipe, log=lambda line: None)
    dataset = load_prepared(recipe)
    lengths = np.asarray(dataset["length"])
    weights = dataset["loss_weights"]
    with open(trl_path + ".tmp", "w", encoding="utf-8") as f:
        for ids, w in zip(dataset["input_ids"], weights):
            f.write(json.dumps({"input_ids": [int(i) for i in ids], "assistant_masks": [int(x > 0) for x in w]}) + "\n")
    os.replace(trl_path + ".tmp", trl_path)
    supervised = sum(int(np.count_nonzero(np.asarray(w))) for w in weights)
    return {
        "conversations": len(lengths),
        "tokens": int(lengths.sum()),
        "supervised_tokens": supervised,
        "median_length": float(np.median(lengths)),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "min_length": int(lengths.min()),
        "dataset": dataset,
        "recipe": recipe,
    }


def epochs_for(data: dict, args: argparse.Namespace, procs: int) -> int:
    """Enough epochs for ``--steps`` steps (crlft plans whole epochs; the packer fills its rows to ~99%)."""
    rows = data["tokens"] / (args.row_tokens * 0.9)
    steps_per_epoch = max(1, int(rows // (procs * args.grad_accum)))
    return math.ceil(args.steps / steps_per_epoch) + 1


# ----------------------------------------------------------------------------------------------------------------
# Packed conversations stay apart: crlft's side (TRL's is in peers_trl.py)
# ----------------------------------------------------------------------------------------------------------------


def check_crlft_isolation(data: dict, row_tokens: int) -> dict:
    """crlft's packed row and attention backend: logits equal the conversations' logits alone.

    Raises:
        AssertionError: positions that do not restart per conversation, or packed logits that differ.
    """
    import torch

    from crlft.attention import packed_attention_kwargs
    from crlft.collate import pack_row
    from crlft.model import load_model
    from crlft.tokenizer import load_tokenizer

    recipe = data["recipe"]
    tokenizer = load_tokenizer(recipe.model.base, TEMPLATE)
    model = load_model(recipe, tokenizer, "cpu").eval()
    attn = model.config._attn_implementation
    examples, total = [], 0
    for ids, w in zip(data["dataset"]["input_ids"], data["dataset"]["loss_weights"]):
        if total + len(ids) > row_tokens:
            break
        examples.append((ids, w))
        total += len(ids)
    row = pack_row(examples, pad_to_multiple_of=64)
    lengths = [len(ids) for ids, _ in examples]
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(row["position_ids"][0, :total], expected), "position_ids do not restart per conversation"
    worst = 0.0
    with torch.no_grad():
        packed = model(
            input_ids=row["input_ids"],
            position_ids=row["position_ids"],
            use_cache=False,
            **packed_attention_kwargs(row, attn),
        ).logits[0]
        start = 0
        for n in lengths:
            alone = model(input_ids=row["input_ids"][:, start : start + n], use_cache=False).logits[0]
            worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
            start += n
    assert worst < 1e-3, f"crlft's packed logits differ from per-conversation ones by {worst:.3g}"
    return {"conversations": len(lengths), "max_abs_logit_diff": worst, "attn_implementation": attn}


# ----------------------------------------------------------------------------------------------------------------
# TRL's environment
# ----------------------------------------------------------------------------------------------------------------


def _venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def ensure_trl_venv(venv: str, version: str) -> dict:
    """A venv with ``trl==version`` over this interpreter's packages (created once); its library versions.

    Raises:
        RuntimeError: when TRL's install replaced torch or transformers in the venv (the comparison would then
            not run on the same libraries).
    """
    modules = "torch, transformers, accelerate, datasets"
    probe = "import json, {0}; print(json.dumps({{m.__name__: m.__version__ for m in ({0},)}}))"
    python = _venv_python(venv)
    ok = (
        os.path.exists(python)
        and subprocess.run(
            [python, "-c", f"import trl, sys; sys.exit(trl.__version__ != {version!r})"], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        print(f"installing trl=={version} into {venv} (its own venv, reusing this interpreter's torch) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"trl=={version}"], check=True
        )
    theirs = json.loads(
        subprocess.run(
            [python, "-c", probe.format(modules + ", trl")],
            capture_output=True,
            text=True,
            check=True,
            env=_clean_env(),
        ).stdout
    )
    ours = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe.format(modules)], capture_output=True, text=True, check=True, env=_clean_env()
        ).stdout
    )
    for name in ("torch", "transformers"):
        if theirs[name] != ours[name]:
            raise RuntimeError(f"{venv}: {name} {theirs[name]} differs from this interpreter's {ours[name]}")
    return theirs


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


# ----------------------------------------------------------------------------------------------------------------
# One run, with the peak RSS of its training processes
# ----------------------------------------------------------------------------------------------------------------


def is_training_process(argv: list[str]) -> bool:
    """A rank: ``python [-u] -m crlft.train ...`` or ``python [-u] .../peers_trl.py ...`` (not a launcher)."""
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        rest = rest[1:]
    if not rest:
        return False
    if rest[0] == "-m":
        return len(rest) > 1 and rest[1] == "crlft.train"
    return os.path.basename(rest[0]) == "peers_trl.py"


def _vm_hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRSS:
    """Samples ``VmHWM`` (the kernel's peak RSS of a process) of every training process under ``root_pid``."""

    def __init__(self, root_pid: int, interval_s: float = 0.2):
        import psutil

        self.root, self.interval, self.peaks, self._stop = psutil.Process(root_pid), interval_s, {}, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self._stop:
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    argv = child.cmdline()
                except psutil.Error:
                    continue
                if is_training_process(argv):
                    peak = _vm_hwm_bytes(child.pid)
                    if peak:
                        self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), peak)
            time.sleep(self.interval)

    def stop(self) -> list[float]:
        """Peak RSS in GiB of each training process seen, largest first."""
        self._stop = True
        self.thread.join()
        return sorted((v / 2**30 for v in self.peaks.values()), reverse=True)


def run_command(argv: list[str], env: dict, log_path: str, timeout: int) -> tuple[float, list[float]]:
    """Runs one training command; its wall seconds and the peak RSS (GiB) of each training process."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        monitor = PeakRSS(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "timeout"
        peaks = monitor.stop()
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited with {rc}; {log_path}:\n{tail}")
    return time.perf_counter() - started, peaks


def run_crlft(recipe_path: str, out: str, procs: int, epochs: int, args: argparse.Namespace) -> dict:
    """``./launch.sh --num_gpus P`` (DeepSpeed ZeRO-2 on CPU ranks); the steps from its ``metrics.jsonl``."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    argv = [
        "bash",
        os.path.join(REPO, "launch.sh"),
        "--num_gpus",
        str(procs),
        recipe_path,
        f"train.output_dir={out}",
        f"train.max_steps={args.steps}",
        f"train.epochs={epochs}",
    ]
    env = _clean_env(OMP_NUM_THREADS=str(max(1, args.threads // procs)), PYTHONPATH=REPO)
    wall_s, peaks = run_command(argv, env, os.path.join(out, "run.log"), args.timeout)
    steps = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            steps.append(
                {"step": r["step"], "seconds": r["step_time_s"], "num_tokens": r["num_tokens"], "loss": r["loss"]}
            )
    return {"side": "crlft", "steps": steps, "wall_s": wall_s, "peak_rss_gib": peaks}


def run_trl(
    model_dir: str, data_path: str, out: str, procs: int, args: argparse.Namespace, check_isolation: bool
) -> dict:
    """``accelerate launch --num_processes P peers_trl.py`` in TRL's venv; rank 0's steps."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    threads = max(1, args.threads // procs)
    from crlft.dist import free_port

    # One process: accelerate's simple launcher. Several: --multi_gpu, i.e. torchrun; without CUDA accelerate runs
    # them as MULTI_CPU over gloo (its --cpu flag would start one process only, without mpirun).
    mode = ["--multi_gpu"] if procs > 1 else ["--cpu"]
    argv = [
        _venv_python(args.trl_venv),
        "-m",
        "accelerate.commands.launch",
        *mode,
        "--num_processes",
        str(procs),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        str(threads),
        "--main_process_port",
        str(free_port()),
        os.path.join(REPO, "benchmarks", "peers_trl.py"),
        "--model",
        model_dir,
        "--data",
        data_path,
        "--out",
        out,
        "--row-tokens",
        str(args.row_tokens),
        "--grad-accum",
        str(args.grad_accum),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
    ]
    if check_isolation:
        argv.append("--check-isolation")
    env = _clean_env(OMP_NUM_THREADS=str(threads))
    wall_s, peaks = run_command(argv, env, os.path.join(out, "run.log"), args.timeout)
    with open(os.path.join(out, "trl_rank0.json")) as f:
        result = json.load(f)
    result.update(wall_s=wall_s, peak_rss_gib=peaks)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def side_summary(runs: list[dict], warmup_steps: int) -> dict:
    """One side of one setting over its repeats: tokens per step, median tokens/s, peak RSS, losses."""
    timed = [s for r in runs for s in r["steps"][warmup_steps:]]
    all_steps = [s for r in runs for s in r["steps"]]
    return {
        "runs": len(runs),
        "steps_per_run": [len(r["steps"]) for r in runs],
        "tokens_per_step": statistics.mean(s["num_tokens"] for s in all_steps),
        "median_tokens_per_s": statistics.median(s["num_tokens"] / s["seconds"] for s in timed),
        "median_tokens_per_s_per_run": [
            statistics.median(s["num_tokens"] / s["seconds"] for s in r["steps"][warmup_steps:]) for r in runs
        ],
        "peak_rss_gib": max(max(r["peak_rss_gib"]) for r in runs),
        "processes": max(len(r["peak_rss_gib"]) for r in runs),
        "first_loss": [r["steps"][0].get("loss") for r in runs],
        "last_loss": [r["steps"][-1].get("loss") for r in runs],
        "wall_s": [r["wall_s"] for r in runs],
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def print_table(results: dict) -> None:
    rows = []
    header = (
        f"{'set':<5} {'procs':>5} {'side':<6} {'tokens/step':>11} {'median tok/s':>12} {'ratio':>6} "
        f"{'peak RSS GiB':>12} {'RSS ratio':>9} {'first loss':>11} {'last loss':>10} {'wall s':>11}"
    )
    rows.append(header)
    rows.append("-" * len(header))
    for setting in results["settings"]:
        for side in ("crlft", "trl"):
            s = setting.get(side)
            if s is None:
                continue
            ratio = f"{setting['speed_ratio']:.2f}x" if side == "crlft" and "speed_ratio" in setting else ""
            rss = f"{setting['rss_ratio']:.2f}x" if side == "crlft" and "rss_ratio" in setting else ""
            rows.append(
                f"{setting['dataset']:<5} {setting['procs']:>5} {side:<6} {s['tokens_per_step']:>11,.0f} "
                f"{s['median_tokens_per_s']:>12,.0f} {ratio:>6} {s['peak_rss_gib']:>12.2f} {rss:>9} "
                f"{s['first_loss'][0]:>11.4f} {s['last_loss'][-1]:>10.4f} "
                f"{'/'.join(f'{w:.0f}' for w in s['wall_s']):>11}"
            )
    print("\n".join(rows), flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    started = time.perf_counter()
    results = {
        "command": "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_before": load_average(),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "settings": [],
        "datasets": {},
        "isolation": {},
    }
    if not args.smoke:
        results["versions"] = ensure_trl_venv(args.trl_venv, args.trl_version)
    import deepspeed
    import torch
    import transformers

    results["machine"].update(
        torch=torch.__version__, transformers=transformers.__version__, deepspeed=deepspeed.__version__
    )
    base = make_base_model(args.work, args.smoke)
    results["model"] = dict(SMOKE_MODEL if args.smoke else MODEL, parameters=_num_params(base))
    data = {}
    for name in args.datasets:
        sources = (
            demo_sources(args.work, args.smoke)
            if name == "demo"
            else long_sources(args.work, args.long_conversations, args.smoke)
        )
        tag = f"{name}_smoke" if args.smoke else name
        recipe = write_recipe(args.work, tag, base, sources, args)
        data[name] = prepare_data(recipe, os.path.join(args.work, f"trl_{tag}.jsonl"))
        data[name]["recipe_path"] = recipe
        results["datasets"][name] = {k: v for k, v in data[name].items() if k not in ("dataset", "recipe")}
        results["isolation"][f"crlft/{name}"] = check_crlft_isolation(data[name], args.row_tokens)
        print(f"{name}: {results['datasets'][name]}", flush=True)

    for procs in args.procs:
        for name in args.datasets:
            runs = {"crlft": [], "trl": []}
            epochs = epochs_for(data[name], args, procs)
            for repeat in range(args.repeats):
                tag = f"{name}_p{procs}_r{repeat}"
                runs["crlft"].append(
                    run_crlft(
                        data[name]["recipe_path"], os.path.join(args.work, "runs", "crlft_" + tag), procs, epochs, args
                    )
                )
                if not args.smoke:
                    trl = run_trl(
                        base,
                        os.path.join(args.work, f"trl_{name}.jsonl"),
                        os.path.join(args.work, "runs", "trl_" + tag),
                        procs,
                        args,
                        check_isolation=repeat == 0 and procs == args.procs[0],
                    )
                    if trl.get("isolation"):
                        results["isolation"][f"trl/{name}"] = trl["isolation"]
                    runs["trl"].append(trl)
                print(
                    f"  {tag}: crlft {runs['crlft'][-1]['wall_s']:.0f} s"
                    + (f", trl {runs['trl'][-1]['wall_s']:.0f} s" if runs["trl"] else "")
                    + f" (load {load_average()})",
                    flush=True,
                )
            setting = {
                "dataset": name,
                "procs": procs,
                "threads_per_process": max(1, args.threads // procs),
                "crlft": side_summary(runs["crlft"], args.warmup_steps),
                "raw": runs,
            }
            if runs["trl"]:
                setting["trl"] = side_summary(runs["trl"], args.warmup_steps)
                setting["speed_ratio"] = setting["crlft"]["median_tokens_per_s"] / setting["trl"]["median_tokens_per_s"]
                setting["rss_ratio"] = setting["crlft"]["peak_rss_gib"] / setting["trl"]["peak_rss_gib"]
                setting["trl_config"] = {
                    k: runs["trl"][0][k]
                    for k in (
                        "packing_strategy",
                        "padding_free",
                        "attn_implementation",
                        "torch_threads",
                        "packed_rows",
                        "mean_row_tokens",
                    )
                }
            results["settings"].append(setting)
            _write_json(args.json, results)  # each setting as it is done, so a stopped run keeps what it measured
            print_table(results)
    results["load_average_after"] = load_average()
    results["total_s"] = time.perf_counter() - started
    print(
        f"load average before {results['load_average_before']}, after {results['load_average_after']}; "
        f"{results['total_s']:.0f} s in all"
    )
    print_table(results)
    _write_json(args.json, results)
    return results


def _write_json(path: str | None, results: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def _num_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    main()
