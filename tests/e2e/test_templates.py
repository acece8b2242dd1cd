"""Templates: training tokens == the exported chat template's tokens, weights, conditions, system prompts, errors.

Templates whose own tokenizer is not available offline (Llama 3's: llama3_instruct, openchat_3.6) are checked with
the Mistral SentencePiece tokenizer plus the template's special tokens: that checks that our rendering and our jinja
agree, which is what the round trip is about.
"""

from __future__ import annotations

import random
import re

import pytest

from crlft.conversation import Conversation, Message
from crlft.render import render, render_batch, to_chat_messages
from crlft.templates import TEMPLATES, Template, get_template
from crlft.tokenizer import load_tokenizer, make_tokenizer

TEXT_PIECES = [
    "Hello", "world", "How are you today?", " ", "  ", "\n", "\n\n", "\t", "", " lead", "trail ", "x  y", "12345",
    "3.14", "é", "中文", "😀", "\u200b", "▁", "def f(x):\n    return x", "a  b   c", ":", "|>", "<|", "<", "GPT4",
]


@pytest.fixture(scope="module")
def openchat_dir(openchat_tokenizer_dir):
    """The saved `build_tokenizer("openchat_3.5", DIR)` directory (session fixture of conftest.py)."""
    return openchat_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizers(openchat_dir):
    """One tokenizer per template: built offline where possible, else Mistral's + the template's special tokens."""
    result = {}
    for name, template in TEMPLATES.items():
        if template.offline_base:
            result[name] = make_tokenizer(name)
        else:
            result[name] = load_tokenizer(openchat_dir, name)
    return result


def _apply(tokenizer, template: Template, conversation: Conversation, messages=None, **kwargs):
    messages = to_chat_messages(conversation) if messages is None else messages
    if template.uses_condition:
        kwargs["condition"] = conversation.condition
    return tokenizer.apply_chat_template(messages, return_dict=False, **kwargs)


def _random_conversation(rng: random.Random) -> Conversation:
    def text():
        return "" if rng.random() < 0.1 else "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(1, 6)))

    messages = [Message(("user", "assistant")[i % 2], text(), (0.0, 1.0)[i % 2]) for i in range(rng.randint(1, 6))]
    system = text() if rng.random() < 0.4 else ""
    return Conversation(messages, system=system, condition=rng.choice(["GPT4 Correct", "Code", "GPT3", ""]))


FIXED_CONVERSATIONS = [
    Conversation([Message("user", "Hello", 0.0), Message("assistant", "Hi", 1.0)]),
    Conversation([Message("user", "Hello"), Message("assistant", "Hi", 1.0), Message("user", "How are you today?"),
                  Message("assistant", "Fine.", 0.5)], system="You are a helpful assistant.", condition="GPT4 Correct"),
    Conversation([Message("user", "  leading and trailing  "), Message("assistant", "\nnewline first\n", 1.0)],
                 condition="Code"),
    Conversation([Message("user", ""), Message("assistant", "", 1.0)], system=" ", condition="GPT3"),
    Conversation([Message("user", "emoji 😀 and 中文 and digits 0123"), Message("assistant", "ok", 1.0)],
                 system="\nsystem with newline"),
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_round_trip_training_tokens_equal_chat_template(name, tokenizers):
    """For every assistant turn: the training tokens up to that turn's start == apply_chat_template(history,
    add_generation_prompt=True); and the whole conversation == apply_chat_template(all messages)."""
    template, tokenizer = TEMPLATES[name], tokenizers[name]
    rng = random.Random(sorted(TEMPLATES).index(name))
    conversations = FIXED_CONVERSATIONS + [_random_conversation(rng) for _ in range(60)]
    checked_turns = 0
    for conversation in conversations:
        ids, weights = render(conversation, template, tokenizer)
        assert ids == _apply(tokenizer, template, conversation), conversation
        messages = to_chat_messages(conversation)
        offset = 1 if conversation.system else 0
        for index, message in enumerate(conversation.messages):
            if message.role != "assistant":
                continue
            prompt = _apply(tokenizer, template, conversation, messages[: offset + index], add_generation_prompt=True)
            assert ids[: len(prompt)] == prompt, (conversation, index)
            # the first token after the prompt is the turn's first text token (or its end-of-turn): weighted
            assert weights[len(prompt)] == message.weight
            assert not any(weights[: len(prompt)][-3:])
            checked_turns += 1
    assert checked_turns > 60


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_round_trip_generation_prompt(name, tokenizers):
    """render(add_generation_prompt=True) == apply_chat_template(add_generation_prompt=True) with the jinja's default
    condition (the template's inference condition)."""
    template, tokenizer = TEMPLATES[name], tokenizers[name]
    for conversation in FIXED_CONVERSATIONS:
        ids, _ = render(conversation, template, tokenizer, add_generation_prompt=True)
        expected_conversation = Conversation(conversation.messages, conversation.system, conversation.condition)
        messages = to_chat_messages(expected_conversation)
        if conversation.condition:
            expected = _apply(tokenizer, template, conversation, messages, add_generation_prompt=True)
        else:  # no condition passed: the jinja's default is the inference condition, as in render
            expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == expected, conversation


def test_openchat_prefix_strings(tokenizers):
    tokenizer = tokenizers["openchat_3.5"]
    conversation = Conversation([Message("user", "Hi"), Message("assistant", "Yo", 1.0)], system="Sys")

    def text(condition, **kwargs):
        conversation.condition = condition
        ids, _ = render(conversation, "openchat_3.5", tokenizer, **kwargs)
        return tokenizer.decode(ids)

    # (legacy SentencePiece: the word after a control token carries the dummy prefix, so decode shows a space)
    assert text("GPT4 Correct") == "<s> Sys<|end_of_turn|> GPT4 Correct User: Hi<|end_of_turn|> " \
                                   "GPT4 Correct Assistant: Yo<|end_of_turn|>"
    assert text("Code").endswith("<|end_of_turn|> Code User: Hi<|end_of_turn|> Code Assistant: Yo<|end_of_turn|>")
    assert text("").endswith("<|end_of_turn|> User: Hi<|end_of_turn|> Assistant: Yo<|end_of_turn|>")
    # generation: an empty condition means the inference condition
    assert text("", add_generation_prompt=True).endswith("Yo<|end_of_turn|> GPT4 Correct Assistant:")
    assert text("GPT3", add_generation_prompt=True).endswith("Yo<|end_of_turn|> GPT3 Assistant:")


def test_other_template_strings(tokenizers):
    conversation = Conversation([Message("user", "Hi"), Message("assistant", "Yo", 1.0)], system="Sys",
                                condition="ignored")
    expected = {
        "chatml": "<s><|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                  "Yo<|im_end|>\n<|im_start|>assistant\n",
        "zephyr": "<s><|system|>\nSys</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n<|assistant|>\n",
        "llama3_instruct": "<s><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|><|start_header_id|>user"
                           "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYo"
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "openchat_3.6": "<s><|start_header_id|>System<|end_header_id|>\n\nSys<|eot_id|><|start_header_id|>ignored User"
                        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>ignored Assistant<|end_header_id|>\n\nYo"
                        "<|eot_id|><|start_header_id|>ignored Assistant<|end_header_id|>\n\n",
    }
    for name, text in expected.items():
        tokenizer = tokenizers[name]
        rendered = tokenizer.apply_chat_template(to_chat_messages(conversation), add_generation_prompt=True,
                                                 tokenize=False, condition=conversation.condition)
        assert rendered == text, name
        ids, _ = render(conversation, name, tokenizer, add_generation_prompt=True)
        assert ids == tokenizer(text, add_special_tokens=False).input_ids, name


def _ids(tokenizer, text, **kwargs):
    return tokenizer(text, add_special_tokens=False, **kwargs).input_ids


@pytest.mark.parametrize("per_sequence_loss", [False, True])
def test_openchat_weights(tokenizers, per_sequence_loss):
    tokenizer = tokenizers["openchat_3.5"]
    conversation = Conversation(
        [Message("user", "Hello"), Message("assistant", "Hi there", 0.7), Message("user", "More?", 0.0),
         Message("assistant", "Yes, more.", 0.25)],
        system="Be brief.", condition="GPT4 Correct",
    )
    ids, weights = render(conversation, "openchat_3.5", tokenizer, per_sequence_loss=per_sequence_loss)
    eot = 32000
    user, assistant = _ids(tokenizer, "GPT4 Correct User:"), _ids(tokenizer, "GPT4 Correct Assistant:")
    segments = [  # (ids, weight of each token)
        ([1], 0.0), (_ids(tokenizer, "Be brief."), 0.0), ([eot], 0.0),
        (user, 0.0), (_ids(tokenizer, "Hello"), 0.0), ([eot], 0.0),
        (assistant, 0.0), (_ids(tokenizer, "Hi there") + [eot], 0.7),
        (user, 0.0), (_ids(tokenizer, "More?"), 0.0), ([eot], 0.0),
        (assistant, 0.0), (_ids(tokenizer, "Yes, more.") + [eot], 0.25),
    ]
    expected_ids, expected_weights = [], []
    for segment, weight in segments:
        if per_sequence_loss and weight:
            weight = weight / len(segment)  # text tokens + end-of-turn
        expected_ids += segment
        expected_weights += [weight] * len(segment)
    assert ids == expected_ids
    assert weights == expected_weights
    assert len(ids) == len(weights)
    if per_sequence_loss:
        assert sum(weights) == pytest.approx(0.7 + 0.25)


def test_separator_after_end_of_turn_weighs_zero(tokenizers):
    tokenizer = tokenizers["chatml"]
    ids, weights = render(Conversation([Message("user", "a"), Message("assistant", "b", 1.0)]), "chatml", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last_end = len(ids) - 1 - ids[::-1].index(im_end)
    assert weights[last_end] == 1.0  # the model learns to end its turn
    assert ids[last_end + 1:] and not any(weights[last_end + 1:])  # "\n" after it is not trained
    content = _ids(tokenizer, "\nb")[2:]  # "b" as it follows "assistant\n" in the whole string
    start = last_end - len(content)
    assert ids[start:last_end] == content and set(weights[start:last_end]) == {1.0}


def test_user_weight_follows_openchat_and_defaults_to_zero(tokenizers):
    tokenizer = tokenizers["openchat_3.5"]
    base = [Message("user", "Hello"), Message("assistant", "Hi", 1.0)]
    _, default = render(Conversation(base), "openchat_3.5", tokenizer)
    _, explicit = render(Conversation([Message("user", "Hello", 0.5), base[1]]), "openchat_3.5", tokenizer)
    assert sum(default) == 2.0  # "▁Hi" + end-of-turn
    assert sum(explicit) == 2.0 + 0.5 * 2  # "▁Hello" + end-of-turn


def test_assistant_without_weight_is_an_error_except_for_generation(tokenizers):
    tokenizer = tokenizers["openchat_3.5"]
    conversation = Conversation([Message("user", "Hello"), Message("assistant", "Hi")])
    with pytest.raises(ValueError, match="conversation 0, message 1: assistant message has no weight"):
        render(conversation, "openchat_3.5", tokenizer)
    ids, weights = render(conversation, "openchat_3.5", tokenizer, add_generation_prompt=True)
    assert not any(weights) and len(ids) == len(weights)


def test_render_batch_equals_render(tokenizers):
    rng = random.Random(3)
    conversations = [_random_conversation(rng) for _ in range(50)]
    for name in TEMPLATES:
        batch_ids, batch_weights = render_batch(conversations, name, tokenizers[name], per_sequence_loss=True)
        for conversation, ids, weights in zip(conversations, batch_ids, batch_weights):
            assert render(conversation, name, tokenizers[name], per_sequence_loss=True) == (ids, weights)


def test_condition_is_ignored_by_templates_without_conditions(tokenizers):
    tokenizer = tokenizers["chatml"]
    messages = [Message("user", "q"), Message("assistant", "a", 1.0)]
    assert render(Conversation(messages, condition="GPT4 Correct"), "chatml", tokenizer) == \
        render(Conversation(messages), "chatml", tokenizer)


def test_system_text_is_rendered_only_when_non_empty(tokenizers):
    tokenizer = tokenizers["openchat_3.5"]
    messages = [Message("user", "q"), Message("assistant", "a", 1.0)]
    without, _ = render(Conversation(messages), "openchat_3.5", tokenizer)
    with_system, weights = render(Conversation(messages, system="S"), "openchat_3.5", tokenizer)
    assert with_system[1:3] == _ids(tokenizer, "S") + [32000] and with_system[3:] == without[1:]
    assert not any(weights[:3])


def test_unknown_template_and_role_errors(tokenizers):
    tokenizer = tokenizers["openchat_3.5"]
    conversation = Conversation([Message("user", "q"), Message("assistant", "a", 1.0)])
    with pytest.raises(ValueError, match="unknown template 'vicuna'; known templates: chatml, llama3_instruct, "
                                         "openchat_3.5, openchat_3.6, zephyr"):
        render(conversation, "vicuna", tokenizer)
    with pytest.raises(ValueError, match="unknown template"):
        get_template("")
    with pytest.raises(ValueError, match="role must be one of"):
        render(Conversation([Message("system", "x")]), "openchat_3.5", tokenizer)
    with pytest.raises(ValueError, match=re.escape("conversation 0: condition 'GPT4<|end_of_turn|>' contains control")):
        render(Conversation(conversation.messages, condition="GPT4<|end_of_turn|>"), "openchat_3.5", tokenizer)
    with pytest.raises(ValueError, match="lacks the control tokens"):
        render(conversation, "chatml", tokenizer)  # the openchat tokenizer has no <|im_start|>


def test_template_table():
    assert isinstance(TEMPLATES, dict)
    openchat = TEMPLATES["openchat_3.5"]
    assert openchat.special_tokens == ("<|end_of_turn|>", "<|pad_0|>")
    assert (openchat.eot, openchat.pad_token, openchat.inference_condition) == ("<|end_of_turn|>", "<|pad_0|>",
                                                                               "GPT4 Correct")
    assert openchat.role_prefix("user", "GPT4 Correct") == "GPT4 Correct User:"
    assert openchat.role_prefix("assistant", "") == "Assistant:"
    assert TEMPLATES["openchat_3.6"].role_prefix("user", "Code") == "<|start_header_id|>Code User<|end_header_id|>\n\n"
    for name, template in TEMPLATES.items():
        assert template.name == name
        assert template.pad_token in template.special_tokens and template.pad_token != template.eot
        with pytest.raises(AttributeError):
            template.eot = "x"  # frozen
