"""The recipe loader: typed conversion, located errors, overrides, validation, the generated DeepSpeed dict."""

import json
import textwrap

import pytest

from crlft.config import deepspeed_config
from crlft.errors import UserError
from crlft.recipe import load_recipe

MINIMAL = """\
model:
  base: some/model
  max_context: 1024
data:
  output_dir: out/data
  sources:
    - name: gpt4
      path: gpt4.jsonl
      format: sharegpt
      condition: GPT4 Correct
      reward: 1.0
    - name: gpt35
      path: gpt35.jsonl
      condition: GPT3
      reward: 0.1
train:
  output_dir: out/run
  batch_max_len: 2048
  lr: 3e-4
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_minimal_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.model.template == "openchat_3.5"
    assert recipe.model.dtype == "bfloat16"
    assert recipe.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; we accept it as a number
    assert recipe.train.betas == [0.9, 0.95]
    assert recipe.data.sources[1].format == "sharegpt"
    assert recipe.data.sources[1].reward == pytest.approx(0.1)
    assert recipe.deepspeed.zero_stage == 2
    assert recipe.to_dict()["data"]["sources"][0]["condition"] == "GPT4 Correct"


def test_overrides_reach_nested_keys_and_list_items(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        ["train.lr=auto", "data.sources.1.reward=0.25", "deepspeed.zero_stage=3", "train.max_steps=null",
         "logging.wandb.mode=offline"],
    )
    assert recipe.train.lr == "auto"
    assert recipe.data.sources[1].reward == 0.25
    assert recipe.deepspeed.zero_stage == 3
    assert recipe.logging.wandb.mode == "offline"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'lrr'; did you mean 'lr'?"),
        ("data.sources.5.reward=1", "has no item 5"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(write(tmp_path, MINIMAL), [override])


def test_unknown_key_is_located_and_suggests_the_closest(tmp_path):
    text = MINIMAL.replace("  batch_max_len: 2048", "  batch_max_length: 2048")
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "recipe.yaml:18 (train.batch_max_length)" in message
    assert "did you mean 'batch_max_len'?" in message


def test_all_problems_are_listed_at_once_with_lines(tmp_path):
    text = MINIMAL.replace("reward: 0.1", "reward: -0.1").replace("lr: 3e-4", "lr: fast")
    text = text.replace("max_context: 1024", "max_context: 4096")
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "problem(s)" in message
    assert "recipe.yaml:19 (train.lr)" in message and "'fast'" in message
    # Type errors stop before validation; fix the lr and the semantic problems are all listed together.
    text = text.replace("lr: fast", "lr: 1e-5")
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "recipe.yaml:15 (data.sources.1.reward): must be a non-negative number" in message
    assert "(train.batch_max_len): must be ≥ model.max_context (4096)" in message


def test_non_numeric_reward_and_bad_choice(tmp_path):
    text = MINIMAL.replace("reward: 0.1", "reward: high").replace("format: sharegpt", "format: csv")
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "(data.sources.1.reward): expected a number, got 'high'" in message
    assert "(data.sources.0.format): must be one of 'openchat', 'sharegpt', 'messages', 'alpaca', got 'csv'" in message


def test_unknown_template_lists_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown template 'openchat_9'; known: .*openchat_3.5"):
        load_recipe(write(tmp_path, MINIMAL), ["model.template=openchat_9"])


def test_missing_recipe_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))


def test_deepspeed_config_is_generated_and_user_file_merges_over_it(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.grad_accum=4", "deepspeed.zero_stage=3"])
    generated = deepspeed_config(recipe)
    assert generated["gradient_accumulation_steps"] == 4
    assert generated["train_micro_batch_size_per_gpu"] == 1
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert generated["bf16"]["enabled"] is True

    user_file = tmp_path / "ds.json"
    user_file.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": False}}))
    recipe = load_recipe(write(tmp_path, MINIMAL), [f"deepspeed.config={user_file}"])
    merged = deepspeed_config(recipe)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000
    assert merged["zero_optimization"]["stage"] == 2  # kept from the generated part
    assert merged["bf16"]["enabled"] is False


@pytest.mark.parametrize("written, expected", [("off", "off"), ("false", "off"), ("true", "auto"), ("auto", "auto"),
                                               ("'off'", "off"), ("runs/x/checkpoints/step_00000010", None)])
def test_resume_accepts_yaml_booleans(tmp_path, written, expected):
    recipe = load_recipe(write(tmp_path, MINIMAL + f"  resume: {written}\n"))
    assert recipe.train.resume == (expected or written)
