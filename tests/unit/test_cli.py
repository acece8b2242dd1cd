"""The command line a new user meets: fast help without markup, other trainers' key names, no silent overwrite."""

import os
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, run_env

from crlft.cli import COMMANDS
from crlft.cli import main as cli_main
from crlft.errors import UserError
from crlft.recipe import load_recipe

OPENCHAT = os.path.join(REPO_ROOT, "recipes", "openchat_3.5.yaml")


def test_help_imports_nothing_heavy():
    """``--help`` in a fresh interpreter: no torch, transformers, datasets, deepspeed or pydantic imported (they take
    seconds; ``crlft eval --help`` used to take 10 s)."""
    heavy = ("torch", "transformers", "datasets", "deepspeed", "pydantic")
    probe = ("import sys, contextlib, io\nfrom crlft.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(sys.argv[1:])\n"
             "    except SystemExit:\n        pass\n"
             f"print([m for m in {heavy!r} if m in sys.modules])")
    for args in (["--help"], ["eval", "--help"], ["plan", "--help"], ["export", "--help"]):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO_ROOT, env=run_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]", (args, result.stdout)
        print(f"crlft {' '.join(args)}: {time.perf_counter() - started:.2f} s")


@pytest.mark.parametrize("command", ["--help", *COMMANDS])
def test_help_is_plain_text(command, capsys):
    args = [command] if command == "--help" else [command, "--help"]
    try:
        assert cli_main(args) == 0
    except SystemExit as done:
        assert done.code == 0
    text = capsys.readouterr().out
    assert "usage: crlft" in text or command == "--help"
    assert "``" not in text  # reST markup does not belong in a terminal


def test_other_trainers_key_names_get_crlfts():
    for key, section, ours in (("learning_rate", "train", "lr"), ("num_train_epochs", "train", "epochs"),
                               ("gradient_accumulation_steps", "train", "grad_accum"),
                               ("max_seq_length", "model", "max_context")):
        with pytest.raises(UserError, match=f"unknown key '{key}'; did you mean '{ours}'"):
            load_recipe(OPENCHAT, [f"{section}.{key}=1"])
    # In another section than crlft's: the full name.
    with pytest.raises(UserError, match="did you mean 'model.max_context'"):
        load_recipe(OPENCHAT, ["train.max_seq_length=1"])


def test_export_refuses_a_non_empty_target_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["export", str(tmp_path / "no_checkpoint"), str(out)]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # With --force (or an empty / new target) it goes on to the checkpoint, which here does not exist.
    assert cli_main(["export", str(tmp_path / "no_checkpoint"), str(out), "--force"]) == 2
    assert "not a complete crlft checkpoint" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "no_checkpoint"), str(tmp_path / "new")]) == 2
    assert "not a complete crlft checkpoint" in capsys.readouterr().err
