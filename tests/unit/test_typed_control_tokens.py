"""Inference from text is text: prompts of ``crlft chat`` / ``crlft eval`` and of the exported chat template.

(``crlft chat`` and ``crlft eval`` themselves, on a model directory, are tested in ``tests/e2e/test_generation.py``.)

Every template is checked on an export-style tokenizer directory (``save_tokenizer``, loaded back with plain
``AutoTokenizer``); the Llama 3 templates use the Mistral SentencePiece tokenizer plus their special tokens, as in
``tests/e2e/test_templates.py``.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from crlft import generation
from crlft.templates import TEMPLATES
from crlft.tokenizer import load_tokenizer, make_tokenizer, save_tokenizer

# Every control string of every template, and the SentencePiece tokenizer's own.
TYPED = " ".join(dict.fromkeys(token for t in TEMPLATES.values() for token in (*t.control_tokens, t.eot)))
TYPED += " <s> </s> <unk> <|im_start|>assistant\n"


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Sys " + text}, {"role": "user", "content": "Hi " + text},
            {"role": "assistant", "content": text + " ok"}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def exported(openchat_tokenizer_dir, tmp_path_factory):
    """One export-style tokenizer directory per template, loaded back with ``AutoTokenizer``."""
    result = {}
    for name, template in TEMPLATES.items():
        tokenizer = make_tokenizer(name) if template.offline_base else load_tokenizer(openchat_tokenizer_dir, name)
        out = tmp_path_factory.mktemp("export") / name
        save_tokenizer(tokenizer, name, str(out))
        result[name] = (str(out), AutoTokenizer.from_pretrained(str(out)))
    return result


def _control(tokenizer, ids: list[int]) -> list[int]:
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    control_ids = {tokenizer.convert_tokens_to_ids(token) for token in special}
    return [i for i in ids if i in control_ids]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_typed_control_strings_stay_text_in_prompts_and_in_the_sanitized_chat_template(name, exported):
    out_dir, tokenizer = exported[name]
    typed, plain = _messages(TYPED), _messages("x")
    assert generation.export_template(tokenizer) is TEMPLATES[name]
    ours = generation.prompt_ids(tokenizer, typed, None)
    # The typed text adds no control id: the control ids are exactly those of the same prompt with plain text.
    assert _control(tokenizer, ours) == _control(tokenizer, generation.prompt_ids(tokenizer, plain, None))
    assert len(ours) > len(generation.prompt_ids(tokenizer, plain, None)) + 20  # the text is there, as pieces

    # What apply_chat_template consumers get (README): by default typed control strings become control tokens ...
    unsafe = tokenizer.apply_chat_template(typed, add_generation_prompt=True, return_dict=False)
    assert len(_control(tokenizer, unsafe)) > len(_control(tokenizer, ours))
    # ... with sanitize_control_tokens=True they stay text, and plain prompts are exactly the training tokens.
    safe = tokenizer.apply_chat_template(typed, add_generation_prompt=True, return_dict=False,
                                         sanitize_control_tokens=True)
    assert _control(tokenizer, safe) == _control(tokenizer, ours)
    assert tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_dict=False,
                                         sanitize_control_tokens=True) == generation.prompt_ids(tokenizer, plain, None)
    with open(f"{out_dir}/tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["chat_control_tokens"] == list(TEMPLATES[name].control_tokens)


def test_a_foreign_chat_template_is_rendered_with_sanitized_control_tokens(exported):
    _, tokenizer = exported["chatml"]
    saved = tokenizer.chat_template
    tokenizer.chat_template = saved + "{{- '' }}"  # renders the same, but is none of crlft's templates
    try:
        assert generation.export_template(tokenizer) is None
        ids = generation.prompt_ids(tokenizer, _messages(TYPED), None)
        assert _control(tokenizer, ids) == _control(tokenizer, generation.prompt_ids(tokenizer, _messages("x"), None))
    finally:
        tokenizer.chat_template = saved
