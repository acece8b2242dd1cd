"""Helpers shared by the tests: the tiny model's shape, synthetic data and recipes, running the trainer.

Everything is built offline (the tokenizer from the SentencePiece model inside ``mistral-common``); nothing reads
``/work/shared``. DeepSpeed runs are subprocesses on the CPU accelerator (gloo), ``OMP_NUM_THREADS=1`` so two ranks
share two cores without oversubscription.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import torch
from transformers import MistralConfig, MistralForCausalLM

from crlft.dist import free_port
from crlft.prepare import prepare
from crlft.recipe import load_recipe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Mistral with the real 32,002-token vocabulary (OpenChat 3.5 tokenizer): 2 layers, hidden 64.
TINY_MISTRAL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}

# From the OpenChat 3.5 model card: messages user "Hello", assistant "Hi", user "How are you today?" rendered with
# add_generation_prompt=True.
CARD_MESSAGES = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "How are you today?"},
]
CARD_MULTI_TURN_IDS = [
    1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747, 15359,
    32000, 420, 6316, 28781, 3198, 3123, 1247, 28747, 1602, 460, 368, 3154, 28804, 32000, 420, 6316, 28781, 3198,
    3123, 21631, 28747,
]
END_OF_TURN_ID, PAD_ID = 32000, 32001


# --------------------------------------------------------------------------------------------------------------
# Synthetic data and recipes
# --------------------------------------------------------------------------------------------------------------

_WORDS = ("red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "sun", "moon", "star")


def synthetic_conversations(num: int, seed: int, style: str) -> list[dict]:
    """ShareGPT records with a learnable pattern: the assistant repeats the user's words in a fixed form.

    ``style="good"`` answers correctly, ``"bad"`` answers with the words reversed (the sub-optimal class).
    """
    rng = random.Random(seed)
    records = []
    for _ in range(num):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
        answer = words if style == "good" else list(reversed(words))
        turns = [
            {"from": "human", "value": "Repeat: " + " ".join(words)},
            {"from": "gpt", "value": "You said " + ", ".join(answer) + "."},
        ]
        if rng.random() < 0.3:
            turns += [{"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes: " + " ".join(answer)}]
        records.append({"conversations": turns})
    return records


def write_jsonl(path, records: list[dict]) -> str:
    """Write records as JSON lines; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def write_recipe(
    tmp_path,
    base_dir: str,
    *,
    num_good: int = 32,
    num_bad: int = 16,
    data_seed: int = 0,
    name: str = "recipe.yaml",
    num_held_out: int = 0,
    **train: object,
) -> str:
    """A recipe for the tiny model on fresh synthetic data in ``tmp_path`` (GPT4 reward 1.0, GPT3 reward 0.1).

    Keyword arguments override ``train`` keys (``epochs=2``...); ``zero_stage`` and ``dtype`` go to their sections.
    ``num_held_out`` > 0 adds two ``data.eval_sources`` of that many conversations each (one per class).
    """
    zero_stage = train.pop("zero_stage", 2)
    dtype = train.pop("dtype", "float32")
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_conversations(num_good, data_seed, "good"))
    bad = write_jsonl(tmp_path / "bad.jsonl", synthetic_conversations(num_bad, data_seed + 1, "bad"))
    train_section = {
        "output_dir": str(tmp_path / "run"),
        "epochs": 3,
        "batch_max_len": 256,
        "lr": 2e-3,
        "lr_warmup_ratio": 0.1,
        "grad_accum": 1,
        "pad_to_multiple_of": 64,
        "keep_last": 2,
        **train,
    }
    text = textwrap.dedent(f"""\
        model:
          base: {base_dir}
          template: openchat_3.5
          max_context: 256
          dtype: {dtype}
          attn_implementation: auto
        data:
          output_dir: {tmp_path / "data"}
          num_proc: 1
          sources:
            - name: gpt4
              path: {good}
              format: sharegpt
              condition: GPT4 Correct
              reward: 1.0
            - name: gpt3
              path: {bad}
              format: sharegpt
              condition: GPT3
              reward: 0.1
        deepspeed:
          zero_stage: {zero_stage}
        """)
    if num_held_out:
        held_out = [
            ("gpt4", "good", "GPT4 Correct", 1.0, synthetic_conversations(num_held_out, data_seed + 100, "good")),
            ("gpt3", "bad", "GPT3", 0.1, synthetic_conversations(num_held_out, data_seed + 101, "bad")),
        ]
        entries = "".join(
            f"    - {{name: {name}_eval, path: {write_jsonl(tmp_path / f'{style}_eval.jsonl', records)}, "
            f"format: sharegpt, condition: {condition}, reward: {reward}}}\n"
            for name, style, condition, reward, records in held_out)
        text = text.replace("data:\n", "data:\n  eval_sources:\n" + entries, 1)
    text += "train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in train_section.items())
    path = tmp_path / name
    path.write_text(text)
    return str(path)



def prepare_recipe(recipe_path: str, overrides: tuple[str, ...] = ()) -> None:
    """``crlft prepare`` in this process (quietly)."""
    prepare(load_recipe(recipe_path, list(overrides)), log=lambda _: None)


# --------------------------------------------------------------------------------------------------------------
# Running the trainer
# --------------------------------------------------------------------------------------------------------------

def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for trainer subprocesses: the repo importable, CPU DeepSpeed, one thread per rank, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.update(extra or {})
    return env


class Launch:
    """A trainer subprocess started now and waited for later.

    On this 2-core machine a CPU run leaves a core idle for a good part of its life (the launcher's start, the
    ranks' imports one after the other, the exit), so independent runs of a test are started together and then
    waited for: the suite's wall time, not what any run computes, is what changes.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], timeout: int, check: bool, cwd: str = REPO_ROOT):
        self.cmd, self.timeout, self.check = cmd, timeout, check
        self._out, self._err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=self._err, text=True,
                                        start_new_session=True)
        self._deadline = time.monotonic() + timeout
        self._result: subprocess.CompletedProcess | None = None

    def wait(self) -> subprocess.CompletedProcess:
        """The finished run (stdout and stderr as text); raises if ``check`` and it failed or ran past its timeout."""
        if self._result is None:
            timed_out = None
            try:
                self.process.wait(timeout=max(self._deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired as timeout:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                timed_out = timeout
            outputs = []
            for f in (self._out, self._err):
                f.seek(0)
                outputs.append(f.read())
                f.close()
            self._result = subprocess.CompletedProcess(self.cmd, self.process.returncode, *outputs)
            if timed_out is not None:
                tail = "\n".join(outputs)[-6000:]
                raise AssertionError(f"{' '.join(self.cmd)} ran past {self.timeout} s:\n{tail}") from timed_out
        if self.check and self._result.returncode != 0:
            tail = (self._result.stdout + "\n" + self._result.stderr)[-6000:]
            raise AssertionError(f"{' '.join(self.cmd)} exited with {self._result.returncode}:\n{tail}")
        return self._result


def deepspeed_command() -> str:
    """The ``deepspeed`` launcher of this Python (next to the interpreter), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.path.isfile(beside) else (shutil.which("deepspeed") or "deepspeed")


def start_deepspeed(recipe_path: str, overrides: tuple[str, ...] = (), num_ranks: int = 2, env: dict | None = None,
                    timeout: int = 600, check: bool = True) -> Launch:
    """Start ``deepspeed --num_gpus N --module crlft.train RECIPE overrides`` on CPU ranks; ``.wait()`` for it."""
    port = free_port()
    cmd = [deepspeed_command(), "--num_gpus", str(num_ranks),
           "--master_port", str(port), "--module", "crlft.train", recipe_path, *overrides]
    launch = Launch(cmd, run_env(env), timeout, check)
    launch.master_port = port  # names DeepSpeed's shared-memory files of this run
    return launch


def run_deepspeed(recipe_path: str, overrides: tuple[str, ...] = (), num_ranks: int = 2, env: dict | None = None,
                  timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --module crlft.train RECIPE overrides`` on CPU ranks, waited for."""
    launch = start_deepspeed(recipe_path, overrides, num_ranks, env, timeout, check)
    result = launch.wait()
    result.master_port = launch.master_port
    return result


def start_single(recipe_path: str, overrides: tuple[str, ...] = (), env: dict | None = None, timeout: int = 600,
                 check: bool = True) -> Launch:
    """Start ``python -m crlft.train RECIPE overrides`` without a launcher (a world of one); ``.wait()`` for it."""
    return Launch([sys.executable, "-m", "crlft.train", recipe_path, *overrides], run_env(env), timeout, check)


def run_single(recipe_path: str, overrides: tuple[str, ...] = (), env: dict | None = None, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python -m crlft.train RECIPE overrides`` without a launcher: a world of one in one process, waited for."""
    return start_single(recipe_path, overrides, env, timeout, check).wait()


def train_together(recipe_path: str, out_root, runs: dict[str, tuple[int, tuple[str, ...]]]) -> dict[str, dict]:
    """Start every run of ``runs`` (name: (ranks, overrides)) at once, in ``out_root/name``; wait for all of them.

    1 rank is ``python -m crlft.train`` (a world of one), more is the DeepSpeed launcher.

    Returns:
        Per name, ``{"metrics": metrics.jsonl's records, "weights": the final export's tensors}``.
    """
    launches = {}
    for name, (ranks, overrides) in runs.items():
        overrides = (f"train.output_dir={os.path.join(str(out_root), name)}", *overrides)
        if ranks == 1:
            launches[name] = start_single(recipe_path, overrides)
        else:
            launches[name] = start_deepspeed(recipe_path, overrides, num_ranks=ranks)
    results = {}
    for name, launch in launches.items():
        launch.wait()
        out = os.path.join(str(out_root), name)
        results[name] = {"metrics": read_metrics(out),
                         "weights": load_safetensors_dir(os.path.join(out, "export", "final"))}
    return results


@contextlib.contextmanager
def world_of_one(monkeypatch):
    """This process as the world of one ``crlft train`` forms without a launcher (CPU accelerator); the launcher's
    variables are restored and the process group destroyed afterwards, whatever the code inside set."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def refusal_of_train_in_process(recipe, monkeypatch) -> str:
    """The ``UserError`` message of ``crlft.trainer.train(recipe)`` in this process (a world of one, CPU), which the
    caller expects to refuse before loading any model; the process group is left destroyed."""
    import pytest

    from crlft.errors import UserError
    from crlft.trainer import train

    with world_of_one(monkeypatch), pytest.raises(UserError) as error:
        train(recipe)
    return str(error.value)


def run_deepspeed_killed_after_step(recipe_path: str, overrides: tuple[str, ...], output_dir: str, step: int,
                                    num_ranks: int = 2, timeout: int = 600) -> int:
    """Like :func:`run_deepspeed`, but SIGKILL the launcher and every rank once ``metrics.jsonl`` logs ``step``.

    The kill comes from outside, as when a machine dies: the whole process group at once, no chance to clean up.

    Returns:
        The launcher's exit status (negative: killed by that signal).
    """
    cmd = [deepspeed_command(), "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), "--module", "crlft.train", recipe_path, *overrides]
    metrics = os.path.join(output_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if _complete_lines(metrics) >= step:
                break
            time.sleep(0.002)  # a step of the tiny model takes far longer than this
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


def _complete_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def read_metrics(output_dir: str) -> list[dict]:
    """The records of ``output_dir/metrics.jsonl``."""
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_safetensors_dir(model_dir: str) -> dict:
    """All tensors of an exported model directory, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, name)))
    return tensors


E2E_EPOCHS = 3
# 34 + 16 conversations: 4 full steps of 2 x 256 tokens per epoch and a fifth holding one row of left-overs, so the
# other rank trains on an empty bin (test_a_rank_with_an_empty_bin_stays_in_step); 15 steps in all.
# Two held-out files of 4 conversations each (data.eval_sources: the training rows stay the same), evaluated every
# 4 steps and at each epoch end: after steps 4, 5, 8, 10, 12 and 15.
E2E_SETTINGS = {"epochs": E2E_EPOCHS, "save_every_steps": 4, "keep_last": 2, "num_good": 34, "num_held_out": 4,
                "eval_every_steps": 4}
E2E_EVAL_STEPS = [4, 5, 8, 10, 12, 15]


def tiny_mistral(vocab=64, tied=False):
    """A 2-layer random Mistral (fp32, sdpa), its lm_head tied to the input embeddings or not."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", tie_word_embeddings=tied,
    )
    model = MistralForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def wandb_history(run_dir: str) -> list[dict]:
    """The history rows (``run.log`` calls) of every offline wandb run under ``run_dir/wandb``, values as JSON text.

    wandb keeps no reader for its ``.wandb`` files: they are LevelDB-style logs (32 KiB blocks of records with a
    7-byte header: crc32, length, type; after a 7-byte file header) of ``wandb_internal_pb2.Record`` messages.
    """
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        pos, block, pending, records = 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):  # a full record, or the last piece of one
                records.append(pending)
        for raw in records:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows

