"""The export answers as the recipe's best class by default, and conditions are never dropped silently."""

import os
import shutil

import pytest
from helpers import REPO_ROOT

from crlft.conditions import best_condition, inference_template
from crlft.errors import UserError
from crlft.recipe import load_recipe, recipe_from_dict

DEMO = os.path.join(REPO_ROOT, "recipes", "demo.yaml")
SORT = [{"role": "user", "content": "Sort the digits of 5031."}]


def _recipe(template="openchat_3.5", sources=None, **model):
    sources = sources or [{"name": "expert", "path": "e.jsonl", "condition": "GPT4", "reward": 1.0},
                          {"name": "sub", "path": "s.jsonl", "condition": "GPT3", "reward": 0.1}]
    return recipe_from_dict({
        "model": {"base": "x", "max_context": 16, "template": template, **model},
        "data": {"output_dir": "d", "sources": sources},
        "train": {"output_dir": "o", "batch_max_len": 16},
    })


def test_best_class_is_the_highest_reward_sources_condition():
    assert best_condition(load_recipe(DEMO)) == "GPT4"
    assert best_condition(_recipe(sources=[{"name": "a", "path": "a", "condition": "GPT3", "reward": 0.1},
                                           {"name": "b", "path": "b", "condition": "GPT4", "reward": 1.0},
                                           {"name": "c", "path": "c", "condition": "Other", "reward": 1.0}])) == "GPT4"
    assert best_condition(_recipe(inference_condition="GPT3")) == "GPT3"  # the recipe's choice wins
    # Records that carry their own conditions (openchat format, no source condition): the template's default.
    assert best_condition(_recipe(sources=[{"name": "a", "path": "a", "format": "openchat"}])) == "GPT4 Correct"
    assert best_condition(_recipe(sources=[{"name": "a", "path": "a"}])) == ""  # SFT without classes: plain prefixes
    assert best_condition(load_recipe(os.path.join(REPO_ROOT, "recipes", "openchat_3.5.yaml"))) == "GPT4 Correct"


@pytest.fixture(scope="module")
def demo_export_tokenizer(openchat_tokenizer_dir, tmp_path_factory):
    """The tokenizer files an export of the demo recipe gets (the trainer loads it with ``inference_template``)."""
    from transformers import AutoTokenizer

    from crlft.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("demo_export_tokenizer")
    load_tokenizer(openchat_tokenizer_dir, inference_template(load_recipe(DEMO))).save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def test_the_demo_export_answers_as_gpt4_without_a_condition(demo_export_tokenizer):
    tokenizer = demo_export_tokenizer
    plain = tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False)
    assert plain == tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False, condition="GPT4")
    assert plain == "<s>GPT4 User: Sort the digits of 5031.<|end_of_turn|>GPT4 Assistant:"
    # The other classes stay reachable.
    gpt3 = tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False, condition="GPT3")
    assert gpt3 == "<s>GPT3 User: Sort the digits of 5031.<|end_of_turn|>GPT3 Assistant:"
    assert tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False, condition="") == (
        "<s>User: Sort the digits of 5031.<|end_of_turn|>Assistant:")


def test_pipeline_with_the_rendered_prompt_generates_what_crlft_chat_does(demo_export_tokenizer, tiny_mistral_dir,
                                                                         tmp_path):
    """The README's recipe for ``pipeline``: render the prompt first, tokenize it without a second BOS."""
    from transformers import pipeline

    from crlft import generation

    export = tmp_path / "export"
    shutil.copytree(tiny_mistral_dir, export)
    demo_export_tokenizer.save_pretrained(str(export))  # the demo's chat template, as an export has it
    model, tokenizer = generation.load_export(str(export))
    expected = generation.generate_batch(model, tokenizer, [generation.prompt_ids(tokenizer, SORT, "GPT4")], 6)[0]
    assert generation.prompt_ids(tokenizer, SORT, None) == generation.prompt_ids(tokenizer, SORT, "GPT4")  # chat

    prompt = tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False, condition="GPT4")
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == generation.prompt_ids(tokenizer, SORT, "GPT4")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe(prompt, add_special_tokens=False, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == expected
    # The README's apply_chat_template + generate, with no condition: the same answer.
    inputs = tokenizer.apply_chat_template(SORT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == expected


def test_conditions_under_a_template_without_them_are_refused():
    with pytest.raises(UserError) as error:
        _recipe(template="chatml")
    message = str(error.value)
    assert "model.template: template 'chatml' has no conditions" in message
    assert "expert (GPT4), sub (GPT3)" in message and "openchat_3.5, openchat_3.6" in message
    assert "data.drop_conditions: true" in message
    recipe = recipe_from_dict({  # the explicit opt-in
        "model": {"base": "x", "max_context": 16, "template": "chatml"},
        "data": {"output_dir": "d", "drop_conditions": True,
                 "sources": [{"name": "a", "path": "a", "condition": "GPT4"}]},
        "train": {"output_dir": "o", "batch_max_len": 16},
    })
    assert best_condition(recipe) == ""
    assert inference_template(recipe).name == "chatml"
    _recipe(template="chatml", sources=[{"name": "a", "path": "a"}])  # no conditions: nothing to lose
    with pytest.raises(UserError, match=r"model.inference_condition: template 'chatml' has no conditions"):
        _recipe(template="chatml", sources=[{"name": "a", "path": "a"}], inference_condition="GPT4")
