"""crlft: C-RLFT (conditioned RL fine-tuning, OpenChat) training on DeepSpeed."""

__version__ = "0.1.0"
