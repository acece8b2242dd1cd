"""The shapes of the bases our recipes and templates are written for, so ``crlft plan`` can size a run before the
weights are downloaded (crlft never downloads).

Each entry is the base's published ``config.json`` (the fields that decide the parameter count and the activation
memory) and the template tokens its tokenizer already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KnownBase:
    """A base model's shape as published.

    Attributes:
        model_id: the Hugging Face id.
        config: ``config.json`` fields (``model_type`` picks the config class).
        tokens_in_vocab: template tokens the base's tokenizer already has (they add no embedding rows).
    """

    model_id: str
    config: dict[str, Any]
    tokens_in_vocab: tuple[str, ...] = ()


_MISTRAL_7B_V01 = {
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000,
    "bos_token_id": 1, "eos_token_id": 2,
}
_LLAMA_3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256, "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# Llama 3's tokenizer reserves its header and end-of-turn tokens (the openchat_3.6 and llama3_instruct templates).
_LLAMA_3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

KNOWN_BASES: dict[str, KnownBase] = {
    base.model_id.lower(): base
    for base in (
        KnownBase("mistralai/Mistral-7B-v0.1", _MISTRAL_7B_V01),
        KnownBase("meta-llama/Meta-Llama-3-8B", _LLAMA_3_8B, _LLAMA_3_TOKENS),
        KnownBase("meta-llama/Meta-Llama-3-8B-Instruct", _LLAMA_3_8B, _LLAMA_3_TOKENS),
    )
}


def known_base(model_id: str) -> KnownBase | None:
    """The published shape of ``model_id`` (case-insensitive), or None."""
    return KNOWN_BASES.get(model_id.strip().lower())


def known_config(base: KnownBase) -> Any:
    """The Hugging Face config object of a known base (built offline)."""
    from transformers import AutoConfig

    fields = dict(base.config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


__all__ = ["KNOWN_BASES", "KnownBase", "known_base", "known_config"]
