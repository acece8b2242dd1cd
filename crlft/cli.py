"""``crlft``: the command line. All argument parsing of crlft lives here; each command calls one library function.

    crlft prepare RECIPE.yaml [section.key=value ...]   tokenize the recipe's sources into a training dataset
    crlft inspect RECIPE.yaml [--n N]                    show rendered conversations with their loss weights
    crlft plan RECIPE.yaml                               parameter count, memory per GPU, steps, learning rate
    crlft train RECIPE.yaml [section.key=value ...]      train in this process (use launch.sh for many ranks)
    crlft export CHECKPOINT OUT                          write a Hugging Face model directory from a checkpoint
    crlft eval RECIPE.yaml [--model DIR]                 exact-match accuracy on the recipe's held-out prompts
    crlft chat EXPORT_DIR [--condition C] [--prompt P]   talk to an exported model
    crlft tokenizer TEMPLATE DIR                         write the template's tokenizer directory, offline
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from crlft.errors import UserError
from crlft.recipe import load_recipe

# The commands import their modules when they run: `crlft --help` and `crlft tokenizer` should not wait for
# deepspeed (5.9 s to import on the 2-core development machine), torch (3.2 s), datasets (3.0 s) or transformers.

def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    return parser


def _quiet_datasets() -> None:
    import datasets

    # Our own errors say what went wrong and where; datasets' logged errors would only repeat it less clearly.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def prepare_main(argv: list[str]) -> int:
    """``crlft prepare RECIPE.yaml [section.key=value ...] [--force]``."""
    from crlft.prepare import prepare

    parser = _recipe_parser("crlft prepare", "Tokenize the recipe's sources into a training dataset "
                            "(data.output_dir) and print what was kept and dropped.")
    parser.add_argument("--force", action="store_true", help="regenerate even when the output is up to date")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="prepare nothing: wait up to SECONDS for another node (node 0) to prepare it")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_datasets()
    if args.wait is not None:
        from crlft.prepare import wait_for_prepared

        wait_for_prepared(recipe, args.wait)
        return 0
    prepare(recipe, force=args.force)
    return 0


def inspect_main(argv: list[str]) -> int:
    """``crlft inspect RECIPE.yaml [--n N] [--source NAME] [section.key=value ...]``."""
    from crlft.inspection import format_inspected, inspect_rows
    from crlft.prepare import recipe_tokenizer

    parser = _recipe_parser("crlft inspect", "Show rendered conversations with their supervised tokens highlighted "
                            "and their loss weights.")
    parser.add_argument("--n", type=int, default=3, help="conversations to show (default 3)")
    parser.add_argument("--source", help="only this source")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be ≥ 1")
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_datasets()
    tokenizer = recipe_tokenizer(recipe)
    color = sys.stdout.isatty()
    for row in inspect_rows(recipe, args.n, args.source, tokenizer):
        print(format_inspected(row, tokenizer, color))
        print()
    return 0


def plan_main(argv: list[str]) -> int:
    """``crlft plan RECIPE.yaml [section.key=value ...] [--num_gpus N]``."""
    from crlft.plan import DEFAULT_NUM_GPUS, plan_text

    parser = _recipe_parser("crlft plan", "Parameter count, memory per GPU, steps per epoch and learning rate of a "
                            "recipe (no GPU).")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                        help=f"data-parallel GPUs (default: $WORLD_SIZE, else {DEFAULT_NUM_GPUS})")
    args = parser.parse_intermixed_args(argv)
    num_gpus = args.num_gpus or int(os.environ.get("WORLD_SIZE", DEFAULT_NUM_GPUS))
    if num_gpus < 1:
        raise UserError(f"--num_gpus must be ≥ 1, got {num_gpus}")
    recipe = load_recipe(args.recipe, args.overrides)
    print(plan_text(recipe, num_gpus))
    return 0


def _without_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher adds ``--local_rank=N`` (or ``--local_rank N``); the same number is in $LOCAL_RANK."""
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
    return cleaned


def train_main(argv: list[str]) -> int:
    """``crlft train RECIPE.yaml [section.key=value ...]``; what every rank of ``python -m crlft.train`` runs."""
    from crlft import trainer

    parser = _recipe_parser("crlft train", "Train a recipe's model with C-RLFT on DeepSpeed (run `crlft prepare "
                            "RECIPE` first; launch.sh does both on all ranks).")
    args = parser.parse_args(_without_local_rank(argv))
    trainer.train(load_recipe(args.recipe, args.overrides))
    return 0


def export_main(argv: list[str]) -> int:
    """``crlft export CHECKPOINT OUT [--dtype D]``: a Hugging Face model directory from any crlft checkpoint.

    ``CHECKPOINT`` may also be a run directory (``train.output_dir``): its newest complete checkpoint is used.
    """
    from crlft.checkpoint import checkpoints_dir, is_complete, latest_checkpoint
    from crlft.export import export_checkpoint
    from crlft.model import DTYPES

    parser = argparse.ArgumentParser(prog="crlft export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory (run/checkpoints/step_N) or a run directory")
    parser.add_argument("out", help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the training dtype")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    if not is_complete(checkpoint) and os.path.isdir(checkpoints_dir(checkpoint)):
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise UserError(f"{checkpoint}: the run has no complete checkpoint yet")
        checkpoint = latest
    export_checkpoint(checkpoint, args.out, dtype=args.dtype)
    return 0


def eval_main(argv: list[str]) -> int:
    """``crlft eval RECIPE.yaml [section.key=value ...] [--model DIR]``: exact-match accuracy per condition."""
    from crlft.generation import run_eval

    parser = _recipe_parser("crlft eval", "Exact-match accuracy of an exported model on the recipe's held-out "
                            "prompts (eval.prompts), under each of eval.conditions.")
    parser.add_argument("--model", help="export directory (default: train.output_dir/export/final)")
    args = parser.parse_args(argv)
    run_eval(load_recipe(args.recipe, args.overrides), args.model)
    return 0


def chat_main(argv: list[str]) -> int:
    """``crlft chat EXPORT_DIR [--condition C] [--system S] [--prompt P]``: talk to an exported model."""
    from crlft.generation import chat

    parser = argparse.ArgumentParser(
        prog="crlft chat",
        description="Chat with an exported model through its own chat template. Interactive by default "
                    "(/reset clears the history, /exit or Ctrl-D quits); --prompt answers once and exits.")
    parser.add_argument("model_dir", help="an export directory, e.g. runs/demo/export/final")
    parser.add_argument("--condition", default=None,
                        help="class condition for OpenChat templates (default: the template's, e.g. 'GPT4 Correct'; "
                             "'Code' for coding mode; '' for plain 'User:')")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", default=None, help="one message: print the answer and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--show-prompt", action="store_true", help="print the rendered prompt before each answer")
    args = parser.parse_args(argv)
    chat(args.model_dir, condition=args.condition, system=args.system, prompt=args.prompt,
         max_new_tokens=args.max_new_tokens, temperature=args.temperature, show_prompt=args.show_prompt)
    return 0


def tokenizer_main(argv: list[str]) -> int:
    """``crlft tokenizer TEMPLATE DIR``: write the template's tokenizer directory offline."""
    from crlft.templates import TEMPLATES, get_template
    from crlft.tokenizer import build_tokenizer

    parser = argparse.ArgumentParser(
        prog="crlft tokenizer", description="Write an HF tokenizer directory for a template (offline).",
    )
    parser.add_argument("template", help=f"one of: {', '.join(sorted(TEMPLATES))}")
    parser.add_argument("dir", help="output directory")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.template, args.dir)
    template = get_template(args.template)
    print(
        f"wrote {args.dir}: {len(tokenizer)} tokens, "
        + ", ".join(f"{token}={tokenizer.convert_tokens_to_ids(token)}" for token in template.special_tokens)
        + f", eos={tokenizer.eos_token}"
    )
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "prepare": prepare_main,
    "inspect": inspect_main,
    "plan": plan_main,
    "train": train_main,
    "export": export_main,
    "eval": eval_main,
    "chat": chat_main,
    "tokenizer": tokenizer_main,
}


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; user errors print one message and exit 2, without a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from crlft import __version__

        print(f"crlft {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"crlft: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return int(COMMANDS[command](rest) or 0)
    except UserError as e:
        if os.environ.get("CRLFT_DEBUG"):
            raise
        print(f"crlft {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crlft {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
