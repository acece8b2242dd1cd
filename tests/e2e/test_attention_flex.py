"""FlexAttention's document mask on a packed row, through transformers' real flex path (one slow compile)."""

import warnings

import pytest
import torch
from attention_helpers import packed_row, per_conversation_logits, tiny_model
from transformers.masking_utils import create_causal_mask


def _cpu_flex_forward_supported() -> str | None:
    """None if FlexAttention runs forward on this CPU, else why not."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # torch < 2.5
        return f"torch has no FlexAttention: {e}"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": this probe only asks if it runs
            x = torch.randn(1, 1, 8, 8)
            flex_attention(x, x, x)
    except (NotImplementedError, RuntimeError) as e:
        return f"FlexAttention does not run on this CPU: {e}"
    return None


@pytest.mark.slow
def test_flex_attention_document_mask_matches_per_conversation():
    """One compile (~40 s cold on 2 busy cores, hence slow): the real transformers flex path, forward only.

    torch 2.13 has no FlexAttention backward on CPU, which is why auto does not pick it there; the forward is
    what proves the document (and sliding window) masking transformers builds from packed position ids.
    """
    reason = _cpu_flex_forward_supported()
    if reason:
        pytest.skip(reason)
    from torch.nn.attention.flex_attention import BlockMask

    model = tiny_model().eval()
    conversations, row = packed_row(lengths=[70, 150, 40], pad_to=128)  # 2 blocks of 128: some can be skipped
    with torch.no_grad():
        reference = per_conversation_logits(model, conversations)[0]
        model.set_attn_implementation("flex_attention")
        embeds = model.get_input_embeddings()(row["input_ids"])
        mask = create_causal_mask(model.config, embeds, None, None, position_ids=row["position_ids"])
        assert isinstance(mask, BlockMask)
        # 3 x 3 blocks of 128: causality alone masks the 3 above the diagonal (33%); the document mask also skips
        # block (2, 0), whose queries (conversation 3 and padding) see nothing of conversations 1 and 2's start.
        assert mask.sparsity() == pytest.approx(100 * 4 / 9)
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[:260], reference, rtol=1e-4, atol=1e-5)
