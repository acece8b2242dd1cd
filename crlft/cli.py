"""``crlft``: the command line. Each sub-command lives with the module that does the work.

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

import importlib
import os
import sys

from crlft.errors import UserError

# sub-command → (module, function taking argv and returning an exit code)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("crlft.data", "prepare_main"),
    "inspect": ("crlft.data", "inspect_main"),
    "plan": ("crlft.plan", "plan_main"),
    "train": ("crlft.train", "main"),
    "export": ("crlft.checkpoint", "export_main"),
    "eval": ("crlft.generation", "eval_main"),
    "chat": ("crlft.generation", "chat_main"),
    "tokenizer": ("crlft.templates", "tokenizer_main"),
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
    module_name, function_name = COMMANDS[command]
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(rest) or 0)
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
