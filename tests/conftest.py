"""Session fixtures: the real OpenChat tokenizer, a tiny random Mistral, and the reference DeepSpeed run.

The helpers they use live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import (
    E2E_SETTINGS,
    REPO_ROOT,
    TINY_MISTRAL,
    free_port,
    prepare_recipe,
    run_deepspeed,
    run_env,
    write_recipe,
)

from crlft.model import create_from_scratch
from crlft.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def openchat_tokenizer_dir(tmp_path_factory) -> str:
    """A saved OpenChat 3.5 tokenizer directory, built offline (``crlft.tokenizer.build_tokenizer``)."""
    out = tmp_path_factory.mktemp("tokenizer") / "openchat_3.5"
    build_tokenizer("openchat_3.5", str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny Mistral (``TINY_MISTRAL``) with the OpenChat 3.5 tokenizer, as an HF directory."""
    out = tmp_path_factory.mktemp("tiny_mistral") / "base"
    create_from_scratch(str(out), TINY_MISTRAL, "openchat_3.5", seed=0)
    return str(out)


@pytest.fixture(scope="session")
def zero2_e2e_run(tmp_path_factory, tiny_mistral_dir) -> dict:
    """ZeRO-2, fp32, 2 CPU ranks, through ``launch.sh`` (which runs ``crlft prepare`` first): 15 steps, 3 epochs.

    Returns ``{"dir": run dir, "log": output, "recipe": recipe path, "dtype": "float32"}``.
    """
    tmp = tmp_path_factory.mktemp("e2e_zero2")
    recipe = write_recipe(tmp, tiny_mistral_dir, zero_stage=2, **E2E_SETTINGS)
    cmd = [os.path.join(REPO_ROOT, "launch.sh"), "--master_port", str(free_port()), recipe]
    result = subprocess.run(cmd, cwd=str(tmp), env=run_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return {"dir": str(tmp / "run"), "log": result.stdout + result.stderr, "recipe": recipe, "dtype": "float32"}



@pytest.fixture(scope="session")
def zero3_e2e_run(tmp_path_factory, tiny_mistral_dir) -> dict:
    """ZeRO-3, bf16, through ``deepspeed --num_gpus 2 --module crlft.train``, logging to an offline wandb run.

    Returns ``{"dir", "log", "recipe", "dtype": "bfloat16", "master_port"}`` like ``zero2_e2e_run``.
    """
    tmp = tmp_path_factory.mktemp("e2e_zero3")
    recipe = write_recipe(tmp, tiny_mistral_dir, zero_stage=3, dtype="bfloat16", **E2E_SETTINGS)
    prepare_recipe(recipe)
    # log_every above the run's length: the printed lines thin out, wandb must still get every step.
    result = run_deepspeed(recipe, ("logging.wandb.project=crlft-e2e", "logging.wandb.mode=offline",
                                    "logging.log_every=100"), num_ranks=2)
    return {"dir": str(tmp / "run"), "log": result.stdout + result.stderr, "recipe": recipe, "dtype": "bfloat16",
            "master_port": result.master_port}
