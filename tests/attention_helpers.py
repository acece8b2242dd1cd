"""Attention test helpers: a tiny Mistral with a sliding window, a packed row, the per-conversation reference."""

import torch
from transformers import MistralConfig, MistralForCausalLM

from crlft.collate import pack_row

LENGTHS = [7, 13, 5]  # 13 > SLIDING_WINDOW: the window must cut the middle conversation
SLIDING_WINDOW = 8
VOCAB = 97


def tiny_model(sliding_window=SLIDING_WINDOW, attn="sdpa"):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=sliding_window,
    )
    model = MistralForCausalLM(config).float()
    model.set_attn_implementation(attn)
    return model


def packed_row(lengths=LENGTHS, pad_to=16):
    generator = torch.Generator().manual_seed(1)
    conversations = [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]
    row = pack_row([(c.numpy(), torch.ones(n).numpy()) for c, n in zip(conversations, lengths)], pad_to)
    return conversations, row


def per_conversation_logits(model, conversations):
    """The reference: every conversation on its own, with transformers' sdpa (plain causal, no packing)."""
    model.set_attn_implementation("sdpa")
    return torch.cat([model(input_ids=c[None], use_cache=False).logits for c in conversations], dim=1)

