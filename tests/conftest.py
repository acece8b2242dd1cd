"""Session fixtures: the real OpenChat tokenizer, a tiny random Mistral, and the two reference DeepSpeed runs.

The helpers they use live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

import pytest
from helpers import (
    E2E_SETTINGS,
    REPO_ROOT,
    TINY_MISTRAL,
    Launch,
    free_port,
    prepare_recipe,
    run_env,
    start_deepspeed,
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
def _reference_runs(tmp_path_factory, tiny_mistral_dir) -> dict:
    """Both reference runs, started together (they share the two cores better than one after the other).

    ZeRO-2, fp32, through ``launch.sh`` (which runs ``crlft prepare`` first), and ZeRO-3, bf16, through
    ``deepspeed --num_gpus 2 --module crlft.train`` logging to an offline wandb run; 15 steps, 3 epochs each.
    """
    zero2_tmp, zero3_tmp = tmp_path_factory.mktemp("e2e_zero2"), tmp_path_factory.mktemp("e2e_zero3")
    zero2_recipe = write_recipe(zero2_tmp, tiny_mistral_dir, zero_stage=2, **E2E_SETTINGS)
    zero3_recipe = write_recipe(zero3_tmp, tiny_mistral_dir, zero_stage=3, dtype="bfloat16", **E2E_SETTINGS)
    prepare_recipe(zero3_recipe)
    zero2 = Launch([os.path.join(REPO_ROOT, "launch.sh"), "--master_port", str(free_port()), zero2_recipe],
                   run_env(), timeout=900, check=True, cwd=str(zero2_tmp))
    # log_every above the run's length: the printed lines thin out, wandb must still get every step.
    zero3 = start_deepspeed(zero3_recipe, ("logging.wandb.project=crlft-e2e", "logging.wandb.mode=offline",
                                           "logging.log_every=100"), num_ranks=2)
    zero2_result, zero3_result = zero2.wait(), zero3.wait()
    return {
        "zero2": {"dir": str(zero2_tmp / "run"), "log": zero2_result.stdout + zero2_result.stderr,
                  "recipe": zero2_recipe, "dtype": "float32"},
        "zero3": {"dir": str(zero3_tmp / "run"), "log": zero3_result.stdout + zero3_result.stderr,
                  "recipe": zero3_recipe, "dtype": "bfloat16", "master_port": zero3.master_port},
    }


@pytest.fixture(scope="session")
def zero2_e2e_run(_reference_runs) -> dict:
    """ZeRO-2, fp32, 2 CPU ranks, through ``launch.sh``: 15 steps, 3 epochs.

    Returns ``{"dir": run dir, "log": output, "recipe": recipe path, "dtype": "float32"}``.
    """
    return _reference_runs["zero2"]


@pytest.fixture(scope="session")
def zero3_e2e_run(_reference_runs) -> dict:
    """ZeRO-3, bf16, through ``deepspeed --num_gpus 2 --module crlft.train``, logging to an offline wandb run.

    Returns ``{"dir", "log", "recipe", "dtype": "bfloat16", "master_port"}`` like ``zero2_e2e_run``.
    """
    return _reference_runs["zero3"]
