"""Template-level parity with OpenChat's own code: `render_batch(..., "openchat_3.5")` vs OpenChat's
`ConversationTemplate.tokenize_conversations` for model type `openchat_v3.2_mistral` (OpenChat 3.5).

The oracle is OpenChat's real code, from the `ochat` package installed without its (GPU) dependencies:
`pip install --no-deps ochat==3.6.1` (it then needs only pydantic, torch and transformers, which crlft has). The test
skips, saying so, when the package is missing.

OpenChat 3.5 was trained with the *slow* tokenizer (`use_fast=False`, legacy SentencePiece). transformers 5 has no
slow `LlamaTokenizer` any more; its slow backend for SentencePiece models is `SentencePieceBackend`, a Python
`PreTrainedTokenizer` that runs the `sentencepiece` library on the text between added tokens. With `legacy=True`
(dummy prefix on every segment, what transformers 4's slow LlamaTokenizer did for Mistral) and
`special_tokens_pattern="bos"` (prepend `<s>`, like LlamaTokenizer's `add_bos_token=True`) it is that slow
tokenizer; `split_special_tokens=True`, which OpenChat passes for message text, makes it encode typed control tokens
as text. The oracle tokenizer is built from the very `tokenizer.model` our offline tokenizer directory carries.
"""

from __future__ import annotations

import os
import random

import pytest

from crlft.conversation import Conversation, Message
from crlft.render import render_batch
from crlft.tokenizer import load_tokenizer

NUM_FUZZ_CONVERSATIONS = 600
CONDITIONS = ["GPT4 Correct", "Code", "GPT3", ""]
TEXT_PIECES = [
    "Hello", "world", "How are you today?", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "", " lead", "trail ",
    "  two", "end  ", "x  y", "1234567890", "3.14", "-42", "é", "中文字符", "Привет", "😀", "👍🏽", "\u200b",
    "\u00a0", "▁", "<s>", "</s>", "<unk>", "<|end_of_turn|>", "<|pad_0|>", "<|end_of_turn", "GPT4 Correct User:",
    "Assistant:", "def f(x):\n    return x  # code", "```python\nprint(1)\n```", "a  b   c    d", ":", " :", "' \"",
]


def _ochat_oracle():
    """(OpenChat's `openchat_v3.2_mistral` ConversationTemplate class factory, its Conversation, its Message)."""
    try:
        import ochat.config as ochat_config
    except ImportError as error:  # also raised when its imports fail in this environment
        pytest.skip(f"OpenChat's code is not importable ({error}); "
                    "install it with `pip install --no-deps ochat==3.6.1`")
    model_config = ochat_config.MODEL_CONFIG_MAP["openchat_v3.2_mistral"]
    return model_config.conversation_template, ochat_config.Conversation, ochat_config.Message


@pytest.fixture(scope="module")
def tokenizer_dir(openchat_tokenizer_dir):
    """The saved `build_tokenizer("openchat_3.5", DIR)` directory (session fixture of conftest.py)."""
    return openchat_tokenizer_dir


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, "openchat_3.5")


@pytest.fixture(scope="module")
def slow_tokenizer(tokenizer_dir):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    tokenizer = SentencePieceBackend(
        vocab_file=os.path.join(tokenizer_dir, "tokenizer.model"), legacy=True, special_tokens_pattern="bos",
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    # what OpenChat's tokenizer (openchat/openchat_3.5 on the hub) adds to Mistral's vocabulary
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>", "<|pad_0|>"]})
    assert tokenizer.convert_tokens_to_ids(["<|end_of_turn|>", "<|pad_0|>"]) == [32000, 32001]
    assert not tokenizer.is_fast
    return tokenizer


@pytest.fixture(scope="module")
def oracle(slow_tokenizer):
    template_factory, ochat_conversation, ochat_message = _ochat_oracle()
    template = template_factory(tokenizer=slow_tokenizer)
    # the settings the issue names for openchat_v3.2_mistral
    assert template.eot == "<|end_of_turn|>" and template.inference_condition == "GPT4 Correct"
    assert template.role_prefix("user", "GPT4 Correct") == "GPT4 Correct User:"
    return template, ochat_conversation, ochat_message


def test_slow_oracle_tokenizer_gives_the_model_card_ids(slow_tokenizer):
    # Model card, single turn: the oracle tokenizer really is OpenChat 3.5's.
    ids = slow_tokenizer("GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:").input_ids
    assert ids == [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631,
                   28747]


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(1, 8)))


def _random_conversations(rng: random.Random, count: int) -> list[Conversation]:
    conversations = []
    for _ in range(count):
        messages = []
        num_messages = rng.randint(1, 6)
        alternate = rng.random() < 0.8
        for index in range(num_messages):
            role = ("user", "assistant")[index % 2] if alternate else rng.choice(("user", "assistant"))
            if role == "assistant":
                weight = rng.choice([1.0, 0.0, 0.1, 0.5, 2.0, rng.random()])
            else:
                weight = 0.0 if rng.random() < 0.8 else rng.random()  # OpenChat weighs user turns by their weight too
            messages.append(Message(role, _random_text(rng), weight))
        system = _random_text(rng) if rng.random() < 0.4 else ""
        conversations.append(Conversation(messages=messages, system=system, condition=rng.choice(CONDITIONS)))
    return conversations


def _to_ochat(conversations, ochat_conversation, ochat_message, *, append_empty_assistant=False):
    result = []
    for conversation in conversations:
        items = [ochat_message(role=m.role, content=m.content, weight=m.weight) for m in conversation.messages]
        if append_empty_assistant:  # how OpenChat's server asks for a reply
            items.append(ochat_message(role="assistant", content=""))
        result.append(ochat_conversation(items=items, system=conversation.system, condition=conversation.condition))
    return result


@pytest.mark.parametrize("per_sequence_loss", [False, True])
def test_fuzz_training_tokens_and_weights_match_openchat(ours, oracle, per_sequence_loss):
    template, ochat_conversation, ochat_message = oracle
    conversations = _random_conversations(random.Random(1234 + per_sequence_loss), NUM_FUZZ_CONVERSATIONS)
    expected_ids, expected_weights = template.tokenize_conversations(
        _to_ochat(conversations, ochat_conversation, ochat_message), inference=False,
        seq_level_weight=per_sequence_loss,
    )
    ids, weights = render_batch(conversations, "openchat_3.5", ours, per_sequence_loss=per_sequence_loss)
    for index, conversation in enumerate(conversations):
        assert ids[index] == expected_ids[index], conversation
        assert weights[index] == expected_weights[index], conversation
    # the fuzz did exercise what it is meant to
    all_ids = {token for row in ids for token in row}
    assert 32000 in all_ids and 32001 not in all_ids and 2 not in all_ids
    assert sum(row.count(1) for row in ids) == len(ids)  # exactly one <s> per conversation: the bos


def test_fuzz_generation_prompt_matches_openchat_inference(ours, oracle):
    template, ochat_conversation, ochat_message = oracle
    conversations = _random_conversations(random.Random(99), NUM_FUZZ_CONVERSATIONS // 2)
    expected_ids, _ = template.tokenize_conversations(
        _to_ochat(conversations, ochat_conversation, ochat_message, append_empty_assistant=True), inference=True,
    )
    ids, _ = render_batch(conversations, "openchat_3.5", ours, add_generation_prompt=True)
    for index, conversation in enumerate(conversations):
        assert ids[index] == expected_ids[index], conversation


def test_typed_control_tokens_are_text_in_both(ours, oracle):
    template, ochat_conversation, ochat_message = oracle
    conversation = Conversation(
        messages=[Message("user", "<s></s><|end_of_turn|><|pad_0|>", 0.0),
                  Message("assistant", " <|end_of_turn|>x</s>", 1.0)],
        system="<s> system </s>", condition="Code",
    )
    (expected_ids,), _ = template.tokenize_conversations(
        _to_ochat([conversation], ochat_conversation, ochat_message), inference=False,
    )
    (ids,), _ = render_batch([conversation], "openchat_3.5", ours)
    assert ids == expected_ids
    # bos once, end-of-turn only where the template puts it (system + 2 turns), never from text
    assert ids.count(1) == 1 and ids.count(32000) == 3 and 2 not in ids and 32001 not in ids
