"""The offline OpenChat 3.5 tokenizer (`crlft tokenizer openchat_3.5 DIR`) against the model card's token ids.

The literals below are the four assertions of the openchat/openchat_3.5 model card. They are checked on the tokenizer
built in memory, on the saved directory loaded with plain `AutoTokenizer.from_pretrained(DIR)`, and on
`load_tokenizer(DIR)` (what training uses).
"""

from __future__ import annotations

import json
import os

import pytest

from crlft.cli import tokenizer_main
from crlft.conversation import Conversation, Message
from crlft.render import render
from crlft.tokenizer import load_tokenizer, make_tokenizer, sentencepiece_backend, tokenizer_fingerprint

SINGLE_TURN_TEXT = "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
SINGLE_TURN_IDS = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631,
                   28747]
MULTI_TURN_TEXT = ("GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi<|end_of_turn|>GPT4 Correct User: "
                   "How are you today?<|end_of_turn|>GPT4 Correct Assistant:")
MULTI_TURN_IDS = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631,
                  28747, 15359, 32000, 420, 6316, 28781, 3198, 3123, 1247, 28747, 1602, 460, 368, 3154, 28804, 32000,
                  420, 6316, 28781, 3198, 3123, 21631, 28747]
CODING_TEXT = "Code User: Implement quicksort using C++<|end_of_turn|>Code Assistant:"
CODING_IDS = [1, 7596, 1247, 28747, 26256, 2936, 7653, 1413, 334, 1680, 32000, 7596, 21631, 28747]
CHAT_MESSAGES = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "How are you today?"},
]
CHAT_IDS = MULTI_TURN_IDS  # the model card's apply_chat_template assertion expects the multi-turn ids


@pytest.fixture(scope="module")
def tokenizer_dir(openchat_tokenizer_dir):
    """The saved `build_tokenizer("openchat_3.5", DIR)` directory (session fixture of conftest.py)."""
    return openchat_tokenizer_dir


@pytest.fixture(scope="module", params=["fresh", "reloaded", "load_tokenizer"])
def tokenizer(request, tokenizer_dir):
    from transformers import AutoTokenizer

    if request.param == "fresh":
        return make_tokenizer("openchat_3.5")
    if request.param == "reloaded":
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    return load_tokenizer(tokenizer_dir, "openchat_3.5")


def test_model_card_single_turn(tokenizer):
    assert tokenizer(SINGLE_TURN_TEXT).input_ids == SINGLE_TURN_IDS


def test_model_card_multi_turn(tokenizer):
    assert tokenizer(MULTI_TURN_TEXT).input_ids == MULTI_TURN_IDS


def test_model_card_coding_mode(tokenizer):
    assert tokenizer(CODING_TEXT).input_ids == CODING_IDS


def test_model_card_apply_chat_template(tokenizer):
    ids = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ids == CHAT_IDS


def test_chat_template_coding_condition_and_plain(tokenizer):
    messages = [{"role": "user", "content": "Implement quicksort using C++"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, condition="Code")
    assert ids == CODING_IDS
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, condition="")
    assert plain == "<s>User: Implement quicksort using C++<|end_of_turn|>Assistant:"


def test_special_token_ids_and_generation_eos(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|end_of_turn|>", "<|pad_0|>"]) == [32000, 32001]
    assert len(tokenizer) == 32002
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    # eos for generation is the end-of-turn token, on the tokenizer itself (and in generation_config.json below)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_turn|>", 32000)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad_0|>", 32001)


def test_typed_control_tokens_never_become_control_ids(tokenizer):
    content = "<s>a</s> <|end_of_turn|>b<|pad_0|><unk>"
    conversation = Conversation([Message("user", content, 0.0), Message("assistant", content, 1.0)], system=content)
    ids, _ = render(conversation, "openchat_3.5", tokenizer)
    assert ids.count(1) == 1  # the bos only
    assert ids.count(32000) == 3  # after the system text and after each turn
    assert not {0, 2, 32001} & set(ids)
    text_ids = tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids
    assert not {0, 1, 2, 32000, 32001} & set(text_ids)
    # decoding gives the typed text back
    assert tokenizer.decode(text_ids) == content


def test_saved_directory_contents(tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig

    names = set(os.listdir(tokenizer_dir))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"} <= names
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    # no Llama class: transformers 5 would rebuild the pre-tokenizer from flags it does not save (losing `legacy`)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    generation = GenerationConfig.from_pretrained(tokenizer_dir)
    assert generation.eos_token_id == 32000
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert reloaded.chat_template and "GPT4 Correct" in reloaded.chat_template
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(make_tokenizer("openchat_3.5"))


def test_backend_encodes_exactly_like_sentencepiece():
    """Runs of spaces, newlines, bytes: the fast tokenizer equals the SentencePiece library (OpenChat's slow one)."""
    import random

    import sentencepiece

    from crlft.tokenizer import mistral_v1_sentencepiece_file

    model_file = mistral_v1_sentencepiece_file()
    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    backend = sentencepiece_backend(model_file)
    backend.encode_special_tokens = True
    rng = random.Random(7)
    alphabet = [" ", "  ", "   ", "\n", "\t", "a", "b", "the", "ing", "Hello", "1", "23", ".", ":", "é", "中文", "😀",
                "\u200b", "\u00a0", "▁", "<s>", "</s>", "ﬁ", "\r\n", "world", "  the"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(3000)]
    texts += ["a  b", "  Hello", " Hello", "x\n\n  y", "b  "]
    expected = [processor.encode(text) for text in texts]
    assert [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)] == expected


def test_fingerprint_is_stable_and_sensitive(tokenizer_dir):
    first = load_tokenizer(tokenizer_dir, "openchat_3.5")
    second = load_tokenizer(tokenizer_dir, "openchat_3.5")
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    second.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(first) != tokenizer_fingerprint(second)
    chatml = load_tokenizer(tokenizer_dir, "chatml")
    assert tokenizer_fingerprint(chatml) != tokenizer_fingerprint(first)


def test_load_tokenizer_appends_template_tokens_in_order(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir, "chatml")
    # the openchat tokens stay where they are; chatml's missing ones are appended in the template's order
    assert tokenizer.convert_tokens_to_ids(["<|end_of_turn|>", "<|pad_0|>", "<|im_start|>", "<|im_end|>"]) == [
        32000, 32001, 32002, 32003]
    assert len(tokenizer) == 32004
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad_0|>"


def test_load_tokenizer_makes_a_plain_llama_config_legacy_and_exact(tmp_path):
    """A directory with only tokenizer.model and a LlamaTokenizer config (transformers 5 builds a non-exact
    Metaspace tokenizer from it) is switched to the exact legacy SentencePiece encoding."""
    import shutil

    from crlft.tokenizer import mistral_v1_sentencepiece_file

    shutil.copyfile(mistral_v1_sentencepiece_file(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": True,
    }))
    tokenizer = load_tokenizer(str(tmp_path), "openchat_3.5")
    assert tokenizer(SINGLE_TURN_TEXT).input_ids == SINGLE_TURN_IDS
    assert tokenizer("a  b", add_special_tokens=False).input_ids == [264, 28705, 287]  # SentencePiece's split


def test_cli_writes_directory(tmp_path, capsys):
    from transformers import AutoTokenizer

    assert tokenizer_main(["openchat_3.5", str(tmp_path / "tok")]) == 0
    assert "<|end_of_turn|>=32000" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok"))(CODING_TEXT).input_ids == CODING_IDS


def test_cli_rejects_templates_without_offline_base(tmp_path):
    with pytest.raises(ValueError, match="not available offline.*openchat_3.5"):
        tokenizer_main(["llama3_instruct", str(tmp_path / "tok")])
    with pytest.raises(ValueError, match="unknown template 'nope'; known templates: chatml, llama3_instruct"):
        tokenizer_main(["nope", str(tmp_path / "tok")])


def test_load_tokenizer_restores_legacy_on_a_resaved_llama_directory(tmp_path):
    """transformers 5's save_pretrained of a LlamaTokenizer drops `legacy: true`; reloaded, it would encode the word
    after `<|end_of_turn|>` without the dummy prefix (`G` 28777 instead of `▁G` 420). load_tokenizer restores it,
    also without the SentencePiece model at hand."""
    import shutil

    from transformers import AutoTokenizer

    from crlft.tokenizer import mistral_v1_sentencepiece_file

    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(mistral_v1_sentencepiece_file(), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": True, "add_bos_token": True,
    }))
    llama = AutoTokenizer.from_pretrained(str(source))
    llama.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>", "<|pad_0|>"]})
    resaved = tmp_path / "resaved"
    llama.save_pretrained(str(resaved))
    if (resaved / "tokenizer.model").exists():
        (resaved / "tokenizer.model").unlink()  # only tokenizer.json left, as in many hub directories
    tokenizer = load_tokenizer(str(resaved), "openchat_3.5")
    assert tokenizer(MULTI_TURN_TEXT).input_ids == MULTI_TURN_IDS
    assert tokenizer.convert_tokens_to_ids(["<|end_of_turn|>", "<|pad_0|>"]) == [32000, 32001]


def test_save_tokenizer_round_trips_a_loaded_tokenizer(tokenizer_dir, tmp_path):
    """What export does: a training tokenizer saved with save_tokenizer loads back with plain AutoTokenizer and
    renders the same tokens through its chat template."""
    from transformers import AutoTokenizer, GenerationConfig

    from crlft.render import to_chat_messages
    from crlft.tokenizer import save_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, "llama3_instruct")
    save_tokenizer(tokenizer, "llama3_instruct", str(tmp_path / "export"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    eot_id = reloaded.convert_tokens_to_ids("<|eot_id|>")
    assert GenerationConfig.from_pretrained(str(tmp_path / "export")).eos_token_id == eot_id == reloaded.eos_token_id
    conversation = Conversation([Message("user", " Hello  there\n"), Message("assistant", "Hi!", 1.0),
                                 Message("user", "Code?")], system="Be brief.")
    ids, _ = render(conversation, "llama3_instruct", tokenizer, add_generation_prompt=True)
    messages = to_chat_messages(conversation)
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ids
