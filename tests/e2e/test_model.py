"""Model loading: mean-initialised new embedding rows, special tokens, attention choice, creating a demo base."""

import json
import os

import pytest
import torch

from crlft.errors import UserError
from crlft.model import (
    choose_attn_implementation,
    create_from_scratch,
    ensure_base_model,
    is_gradient_checkpointing,
    load_model,
    resize_embeddings_with_mean,
    resolve_model_dir,
)
from crlft.recipe import recipe_from_dict

TINY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}

# From the OpenChat 3.5 model card: the two tokens the template adds to Mistral-7B-v0.1's 32,000.
END_OF_TURN_ID, PAD_ID = 32000, 32001
CARD_PROMPT = "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
CARD_IDS = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747]


def recipe_for(base, **model):
    return recipe_from_dict({
        "model": {"base": str(base), "template": "openchat_3.5", "max_context": 64, "dtype": "float32",
                  "attn_implementation": "auto", **model},
        "data": {"output_dir": "unused", "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": "unused", "batch_max_len": 64, "lr": 1e-4},
    })


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch") / "base"
    create_from_scratch(str(out), TINY, "openchat_3.5", seed=0)
    return out


@pytest.fixture(scope="module")
def mistral_v1_like_dir(tmp_path_factory, scratch_dir):
    """A base like Mistral-7B-v0.1: 32,000 embedding rows (no template tokens), untied lm_head."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("v1") / "base"
    model = AutoModelForCausalLM.from_pretrained(scratch_dir)
    model.resize_token_embeddings(32000)
    model.config.update({"vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None})
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model.save_pretrained(out)
    return out


def test_create_from_scratch_dir_loads_with_auto_classes(scratch_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(scratch_dir)
    tokenizer = AutoTokenizer.from_pretrained(scratch_dir)
    assert model.config.model_type == "mistral"
    assert model.config.vocab_size == len(tokenizer) == 32002
    assert model.get_input_embeddings().weight.shape == (32002, TINY["hidden_size"])
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == END_OF_TURN_ID
    assert tokenizer.convert_tokens_to_ids("<|pad_0|>") == PAD_ID
    assert tokenizer(CARD_PROMPT).input_ids == CARD_IDS
    assert model.generation_config.eos_token_id == END_OF_TURN_ID
    assert model.config.pad_token_id == PAD_ID
    # Nothing left behind next to it.
    assert [p for p in os.listdir(scratch_dir.parent) if p.startswith(".crlft-create-")] == []


def test_create_from_scratch_is_seeded_and_refuses_to_overwrite(tmp_path, scratch_dir):
    from transformers import AutoModelForCausalLM

    again = create_from_scratch(str(tmp_path / "again"), TINY, "openchat_3.5", seed=0)
    first = AutoModelForCausalLM.from_pretrained(scratch_dir)
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="not empty"):
        create_from_scratch(str(scratch_dir), TINY, "openchat_3.5")
    with pytest.raises(UserError, match="unknown MistralConfig"):
        create_from_scratch(str(tmp_path / "bad"), {"hidden_sise": 8}, "openchat_3.5")
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        create_from_scratch(str(tmp_path / "small"), {**TINY, "vocab_size": 100}, "openchat_3.5")


def test_ensure_base_model_creates_only_when_missing(tmp_path):
    base = tmp_path / "demo" / "base"
    recipe = recipe_for(base, create_if_missing=TINY)
    assert ensure_base_model(recipe) is True
    assert json.loads((base / "config.json").read_text())["hidden_size"] == 16
    assert ensure_base_model(recipe) is False
    assert ensure_base_model(recipe_for(tmp_path / "other")) is False  # no create_if_missing: nothing happens
    assert not (tmp_path / "other").exists()


def test_mean_initialised_rows_untied_and_tied():
    from transformers import MistralConfig, MistralForCausalLM

    for tied in (False, True):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=50, tie_word_embeddings=tied, **TINY))
        old_in = model.get_input_embeddings().weight.detach().clone()
        old_out = model.get_output_embeddings().weight.detach().clone()
        assert resize_embeddings_with_mean(model, 53) == 3
        new_in = model.get_input_embeddings().weight
        new_out = model.get_output_embeddings().weight
        assert new_in.shape == (53, 16) and new_out.shape == (53, 16)
        assert torch.equal(new_in[:50], old_in) and torch.equal(new_out[:50], old_out)
        for row in range(50, 53):
            torch.testing.assert_close(new_in[row], old_in.mean(0), rtol=0, atol=1e-7)
            torch.testing.assert_close(new_out[row], old_out.mean(0), rtol=0, atol=1e-7)
        assert (new_in.data_ptr() == new_out.data_ptr()) == tied
        assert resize_embeddings_with_mean(model, 40) == 0  # never shrinks


def test_load_model_adds_template_tokens_with_mean_rows(mistral_v1_like_dir, scratch_dir):
    from transformers import AutoModelForCausalLM

    from crlft.tokenizer import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(mistral_v1_like_dir)
    tokenizer = load_tokenizer(str(scratch_dir), "openchat_3.5")  # Mistral v1 + the template's two tokens
    model = load_model(recipe_for(mistral_v1_like_dir), tokenizer)

    assert len(tokenizer) == 32002
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == END_OF_TURN_ID
    assert tokenizer.convert_tokens_to_ids("<|pad_0|>") == PAD_ID
    assert model.get_input_embeddings().weight.shape[0] == 32002
    assert model.get_output_embeddings().weight.shape[0] == 32002
    for module_name in ("get_input_embeddings", "get_output_embeddings"):
        old = getattr(base, module_name)().weight
        new = getattr(model, module_name)().weight
        assert torch.equal(new[:32000], old)
        for token_id in (END_OF_TURN_ID, PAD_ID):
            torch.testing.assert_close(new[token_id], old.float().mean(0), rtol=0, atol=1e-7)
    assert model.config.use_cache is False
    assert model.config.pad_token_id == PAD_ID
    assert model.generation_config.eos_token_id == END_OF_TURN_ID
    assert model.dtype == torch.float32
    assert model.training


def test_gradient_checkpointing_flag(scratch_dir):
    from crlft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(scratch_dir), "openchat_3.5")
    off = load_model(recipe_for(scratch_dir), tokenizer)
    on = load_model(recipe_for(scratch_dir, gradient_checkpointing=True), tokenizer)
    assert not is_gradient_checkpointing(off)
    assert is_gradient_checkpointing(on)
    assert all(layer.gradient_checkpointing for layer in on.model.layers)
    # Same model either way; checkpointing changes memory, not numbers.
    ids = torch.tensor([CARD_IDS])
    out_off = off(input_ids=ids, labels=ids).loss
    out_on = on(input_ids=ids, labels=ids).loss
    out_on.backward()
    torch.testing.assert_close(out_off, out_on)
    assert on.model.embed_tokens.weight.grad is not None
    bf16 = load_model(recipe_for(scratch_dir, dtype="bfloat16"), tokenizer)
    assert bf16.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_attention_choice_on_cpu():
    chosen = choose_attn_implementation("auto", "cpu", torch.float32)
    # Never flash-attn on a CPU, and never a backend that needs a dense [T, T] mask for packed rows.
    assert chosen not in ("flash_attention_2", "sdpa", "eager")
    assert choose_attn_implementation("sdpa", "cpu", torch.float32) == "sdpa"
    with pytest.raises(UserError, match="flash_attention_2"):
        choose_attn_implementation("flash_attention_2", "cpu", torch.float32)


def test_missing_base_is_a_clear_error_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the Hugging Face cache; crlft never downloads"):
        resolve_model_dir("no-such-org-crlft/no-such-model", "recipe.yaml:2 (model.base)")
    with pytest.raises(UserError, match="directory not found"):
        resolve_model_dir(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"recipe.yaml:2 \(model.base\)"):
        resolve_model_dir("no-such-org-crlft/no-such-model", "recipe.yaml:2 (model.base)")
