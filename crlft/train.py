"""The entry every rank runs: ``python -m crlft.train RECIPE.yaml [section.key=value ...]``.

Under the DeepSpeed launcher (one process per GPU, or per CPU rank; ``--hostfile`` for many nodes)::

    deepspeed --num_gpus 8 --module crlft.train recipes/openchat_3.5.yaml train.lr=1e-5

(DeepSpeed's runner spells the module flag ``--module``; ``launch.sh`` wraps all of this and runs ``crlft prepare``
first.) The launcher adds ``--local_rank=N`` to the arguments; it is accepted and ignored, since the same number is
in the ``LOCAL_RANK`` environment variable. ``crlft train RECIPE`` runs the same code in the current process as a
world of one.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``RECIPE [overrides]``, load the recipe and train; returns the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``); ``--local_rank=N`` / ``--local_rank N`` are dropped.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip_next = True
            continue
        cleaned.append(arg)
    parser = argparse.ArgumentParser(
        prog="crlft train",
        description="Train a recipe's model with C-RLFT on DeepSpeed (run `crlft prepare RECIPE` first; "
        "launch.sh does both on all ranks).",
    )
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    args = parser.parse_args(cleaned)

    from crlft.config import load_recipe
    from crlft.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe)
    return 0


if __name__ == "__main__":
    from crlft.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
