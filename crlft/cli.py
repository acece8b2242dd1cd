"""``crlft``: the command line. All argument parsing of crlft lives here; each command calls one library function.

    crlft prepare RECIPE.yaml [section.key=value ...]   tokenize the recipe's sources into a training dataset
    crlft inspect RECIPE.yaml [--n N]                    show rendered conversations with their loss weights
    crlft plan RECIPE.yaml [--num_gpus N]                parameter count, memory per GPU, steps, learning rate
    crlft preflight RECIPE.yaml [--num_gpus N]           before launching: is the run complete, may it resume?
    crlft train RECIPE.yaml [section.key=value ...]      train in this process (use launch.sh for many ranks)
    crlft export CHECKPOINT OUT [--force]                write a Hugging Face model directory from a checkpoint
    crlft eval RECIPE.yaml [--model DIR]                 exact-match accuracy on the recipe's held-out prompts
    crlft chat EXPORT_DIR [--condition C] [--prompt P]   talk to an exported model
    crlft tokenizer TEMPLATE DIR                         write the template's tokenizer directory, offline

Every command takes --debug (anywhere on its line; the same as CRLFT_DEBUG=1): tracebacks for errors and
DeepSpeed's own log lines. `crlft COMMAND --help` tells more.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from crlft.errors import UserError

# The commands import their modules after parsing their arguments: `crlft --help` and `crlft COMMAND --help` should
# not wait for deepspeed (5.9 s to import on the 2-core development machine), torch (3.2 s), datasets (3.0 s) or
# transformers.

DEBUG_ENV = "CRLFT_DEBUG"


def load_recipe(path: str, overrides: list[str]):
    """``crlft.recipe.load_recipe``, imported when a command runs (pydantic and yaml are not needed for help)."""
    from crlft.recipe import load_recipe as load

    return load(path, overrides)


def debug_enabled() -> bool:
    """Whether ``--debug`` (or ``CRLFT_DEBUG=1``) is on."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")

def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    return parser


def _quiet_datasets() -> None:
    if debug_enabled():
        return
    import datasets

    # Our own errors say what went wrong and where; datasets' logged errors would only repeat it less clearly.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def prepare_main(argv: list[str]) -> int:
    """``crlft prepare RECIPE.yaml [section.key=value ...] [--force]``."""
    parser = _recipe_parser("crlft prepare", "Tokenize the recipe's sources into a training dataset "
                            "(data.output_dir) and print what was kept and dropped.")
    parser.add_argument("--force", action="store_true", help="regenerate even when the output is up to date")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="prepare nothing: wait up to SECONDS for another node (node 0) to prepare it")
    args = parser.parse_args(argv)
    from crlft.prepare import prepare

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
    parser = _recipe_parser("crlft inspect", "Show rendered conversations with their supervised tokens highlighted "
                            "and their loss weights.")
    parser.add_argument("--n", type=int, default=3, help="conversations to show (default 3)")
    parser.add_argument("--source", help="only this source")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be ≥ 1")
    from crlft.inspection import format_inspected, inspect_rows
    from crlft.prepare import recipe_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_datasets()
    tokenizer = recipe_tokenizer(recipe)
    color = sys.stdout.isatty()
    for row in inspect_rows(recipe, args.n, args.source, tokenizer):
        print(format_inspected(row, tokenizer, color))
        print()
    return 0


def _num_gpus_option(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                        help=f"data-parallel ranks ({default_text})")


def plan_main(argv: list[str]) -> int:
    """``crlft plan RECIPE.yaml [section.key=value ...] [--num_gpus N]``."""
    parser = _recipe_parser("crlft plan", "Parameter count, memory per GPU, steps per epoch and learning rate of a "
                            "recipe (no GPU needed).")
    _num_gpus_option(parser, "default: $WORLD_SIZE, else this machine's GPUs, else 2 CPU ranks as launch.sh runs")
    args = parser.parse_intermixed_args(argv)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UserError(f"--num_gpus must be ≥ 1, got {args.num_gpus}")
    from crlft.plan import machine_num_gpus, plan_text

    recipe = load_recipe(args.recipe, args.overrides)
    num_gpus, where = (args.num_gpus, "--num_gpus") if args.num_gpus else machine_num_gpus()
    print(plan_text(recipe, num_gpus, where))
    return 0


def preflight_main(argv: list[str]) -> int:
    """``crlft preflight RECIPE.yaml [--num_gpus N] [section.key=value ...]``: what launch.sh checks before ranks."""
    parser = _recipe_parser("crlft preflight", "Before starting ranks (launch.sh runs it): refuse a resume the "
                            "recipe cannot do, and say when the run is already complete. Exit status 0: start "
                            "training; 10: complete; 11: complete, only crlft eval left; 2: refused.")
    _num_gpus_option(parser, "the ranks the launcher will start; unset: the checkpoint's rank count is not checked")
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--prepare", action="store_true",
                       help="run crlft prepare first, in the same process (one start-up less for launch.sh)")
    first.add_argument("--wait", type=float, metavar="SECONDS",
                       help="first wait up to SECONDS for another node (node 0) to prepare the dataset, as "
                            "crlft prepare --wait does, in the same process")
    args = parser.parse_intermixed_args(argv)
    from crlft.preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    if args.prepare:
        from crlft.prepare import prepare

        _quiet_datasets()
        prepare(recipe)
    elif args.wait is not None:
        from crlft.prepare import wait_for_prepared

        _quiet_datasets()
        wait_for_prepared(recipe, args.wait)
    return preflight(recipe, args.num_gpus)


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
    parser = _recipe_parser("crlft train", "Train a recipe's model with C-RLFT on DeepSpeed (run `crlft prepare "
                            "RECIPE` first; launch.sh does both on all ranks).")
    args = parser.parse_args(_without_local_rank(argv))
    from crlft import trainer

    trainer.train(load_recipe(args.recipe, args.overrides))
    return 0


def export_main(argv: list[str]) -> int:
    """``crlft export CHECKPOINT OUT [--dtype D] [--force]``: a Hugging Face model directory from a checkpoint."""
    parser = argparse.ArgumentParser(
        prog="crlft export",
        description="Write a Hugging Face model directory (safetensors, config, tokenizer with its chat template) "
                    "from any crlft checkpoint. CHECKPOINT may also be a run directory (train.output_dir): its newest "
                    "complete checkpoint is used.")
    parser.add_argument("checkpoint", help="a checkpoint directory (run/checkpoints/step_N) or a run directory")
    parser.add_argument("out", help="the Hugging Face model directory to write (new or empty, unless --force)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: the training dtype")
    parser.add_argument("--force", action="store_true", help="replace OUT when it exists and is not empty")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)) and not args.force:
        raise UserError(f"{args.out} exists and is not empty; pass --force to replace it, or choose another OUT")
    from crlft.checkpoint import checkpoints_dir, is_complete, latest_checkpoint
    from crlft.export import export_checkpoint

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
    parser = _recipe_parser("crlft eval", "Exact-match accuracy of an exported model on the recipe's held-out "
                            "prompts (eval.prompts), under each of eval.conditions.")
    parser.add_argument("--model", help="export directory (default: train.output_dir/export/final)")
    args = parser.parse_args(argv)
    from crlft.generation import run_eval

    run_eval(load_recipe(args.recipe, args.overrides), args.model)
    return 0


def chat_main(argv: list[str]) -> int:
    """``crlft chat EXPORT_DIR [--condition C] [--system S] [--prompt P]``: talk to an exported model."""
    parser = argparse.ArgumentParser(
        prog="crlft chat",
        description="Chat with an exported model through its own chat template. Interactive by default "
                    "(/reset clears the history, /exit or Ctrl-D quits); --prompt answers once and exits.")
    parser.add_argument("model_dir", help="an export directory, e.g. runs/demo/export/final")
    parser.add_argument("--condition", default=None,
                        help="class condition for OpenChat templates (default: the export's, the best class of the "
                             "recipe it was trained with, e.g. 'GPT4 Correct'; 'Code' for coding mode; '' for plain "
                             "'User:')")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", default=None, help="one message: print the answer and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--show-prompt", action="store_true", help="print the rendered prompt before each answer")
    args = parser.parse_args(argv)
    from crlft.generation import chat

    chat(args.model_dir, condition=args.condition, system=args.system, prompt=args.prompt,
         max_new_tokens=args.max_new_tokens, temperature=args.temperature, show_prompt=args.show_prompt)
    return 0


def tokenizer_main(argv: list[str]) -> int:
    """``crlft tokenizer TEMPLATE DIR``: write the template's tokenizer directory offline."""
    from crlft.templates import TEMPLATES, get_template

    parser = argparse.ArgumentParser(
        prog="crlft tokenizer", description="Write an HF tokenizer directory for a template (offline).",
    )
    parser.add_argument("template", help=f"one of: {', '.join(sorted(TEMPLATES))}")
    parser.add_argument("dir", help="output directory")
    args = parser.parse_args(argv)
    from crlft.tokenizer import build_tokenizer

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
    "preflight": preflight_main,
    "train": train_main,
    "export": export_main,
    "eval": eval_main,
    "chat": chat_main,
    "tokenizer": tokenizer_main,
}


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; user errors print one message and exit 2, without a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # anywhere on the line; the ranks a launcher starts inherit it through the environment
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        # The docstring without its first line, which is for readers of the code.
        print("crlft: train chat models with C-RLFT on DeepSpeed.\n\n" + __doc__.split("\n\n", 1)[1].strip())
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
        if debug_enabled():
            raise
        # An error every rank finds alike (a refused resume) is printed by rank 0 only.
        if not (getattr(e, "reported_by_rank_0", False) and os.environ.get("RANK", "0") != "0"):
            print(f"crlft {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crlft {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
