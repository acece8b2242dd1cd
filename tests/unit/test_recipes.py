"""Every recipe in recipes/ loads and validates; the OpenChat 3.5 recipe says what the model card and OpenChat's
trainer say; overrides, typo hints and located validation errors work on real recipes."""

import dataclasses
import glob
import importlib.util
import os
import sys

import pytest
import yaml
from helpers import REPO_ROOT as ROOT

from crlft.config import Recipe
from crlft.errors import UserError
from crlft.recipe import load_recipe

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
OPENCHAT = os.path.join(ROOT, "recipes", "openchat_3.5.yaml")


def test_there_are_recipes():
    assert OPENCHAT in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    recipe.validate()
    assert recipe.source_path == path
    assert recipe.data.sources


def test_openchat_3_5_recipe_matches_the_published_setup():
    r = load_recipe(OPENCHAT)
    assert r.model.base == "mistralai/Mistral-7B-v0.1"
    assert r.model.template == "openchat_3.5"
    assert r.model.max_context == 8192
    assert r.model.dtype == "bfloat16"
    assert r.model.gradient_checkpointing is True
    # The recorded run (openchat.json beside the released weights; OpenChat's trainer at 533bb0a for the loss).
    assert r.train.batch_max_len == 81920
    assert r.train.epochs == 5
    assert r.train.lr == 1.2507232220003032e-05
    assert (r.train.lr_warmup_ratio, r.train.lr_min_ratio, r.train.weight_decay) == (0.05, 0.1, 0.1)
    assert r.train.betas == [0.9, 0.95] and r.train.eps == 1e-5 and r.train.grad_clip == 1.0
    assert r.train.grad_accum == 1 and r.train.loss_normalization == "weight_sum_row_mean"
    text = open(OPENCHAT).read()
    assert "export/epoch_3" in text  # the release is the model after the third of five epochs
    assert r.deepspeed.zero_stage == 2
    assert r.data.reward_to_weight == "linear" and r.data.per_sequence_loss is False

    by_name = {s.name: s for s in r.data.sources}
    # The card's datasets, each as one or two sources.
    expected = {"sharegpt_gpt4", "sharegpt_gpt35", "openorca_flan", "capybara", "goat",
                "glaive_code", "metamathqa", "mathinstruct", "oasst_top1"}
    assert set(by_name) == expected
    for name in ("sharegpt_gpt4", "openorca_flan", "capybara", "goat", "metamathqa", "mathinstruct", "oasst_top1"):
        assert (by_name[name].condition, by_name[name].reward) == ("GPT4 Correct", 1.0), name
    for name in ("sharegpt_gpt35",):  # sub-optimal: own condition, the paper's reward 0.1
        assert by_name[name].condition not in ("GPT4 Correct", "Code", "")
        assert by_name[name].reward == 0.1
    assert by_name["glaive_code"].condition == "Code"


def test_openchat_recipe_paths_are_what_data_prep_writes():
    spec = importlib.util.spec_from_file_location(
        "openchat_3_5_sources", os.path.join(ROOT, "data_prep", "openchat_3_5_sources.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    stems = {stem for name in module.default_datasets() for stem in module.DATASETS[name].outputs}
    r = load_recipe(OPENCHAT)
    for source in r.data.sources:
        directory, filename = os.path.split(source.path)
        assert directory == "data/openchat_3.5/sources"
        assert filename == f"{source.name}.jsonl" and source.name in stems
    assert stems == {s.name for s in r.data.sources}  # nothing converted goes unused


@pytest.mark.parametrize("path", [OPENCHAT, OPENCHAT.replace(".yaml", "_lora.yaml")], ids=os.path.basename)
def test_openchat_recipe_spells_out_every_key(path):
    """Like torchtune's configs: every field of every section (and of every source) is written in the file."""
    with open(path) as f:
        raw = yaml.safe_load(f)

    def fields(cls):
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "source_path"}

    recipe = load_recipe(path)
    if recipe.model.lora is not None:
        assert set(raw["model"]["lora"]) == fields(type(recipe.model.lora))
    assert set(raw) == fields(Recipe)
    for section in raw:
        section_cls = type(getattr(recipe, section))
        assert set(raw[section]) == fields(section_cls), section
    for source in raw["data"]["sources"]:
        assert set(source) == fields(type(recipe.data.sources[0])), source["name"]
    assert set(raw["logging"]["wandb"]) == fields(type(recipe.logging.wandb))


def test_overrides_apply_to_a_real_recipe():
    r = load_recipe(OPENCHAT, ["train.lr=1e-5", "deepspeed.zero_stage=3", "data.sources.1.reward=0.2",
                               "model.base=/models/mistral"])
    assert r.train.lr == 1e-5
    assert r.deepspeed.zero_stage == 3
    assert r.data.sources[1].reward == 0.2
    assert r.model.base == "/models/mistral"


def test_unknown_key_suggests_the_closest(tmp_path):
    text = open(OPENCHAT).read().replace("  batch_max_len: 81920", "  batch_max_length: 81920")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    message = str(info.value)
    line = text.splitlines().index("  batch_max_length: 81920") + 1
    assert f"{path}:{line} (train.batch_max_length): unknown key 'batch_max_length'" in message
    assert "did you mean 'batch_max_len'" in message
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        load_recipe(OPENCHAT, ["train.epoch=3"])


def test_validation_lists_every_problem_with_file_and_line(tmp_path):
    text = open(OPENCHAT).read()
    text = text.replace("  epochs: 5", "  epochs: 0").replace("  batch_max_len: 81920", "  batch_max_len: 4096")
    text = text.replace("      reward: 0.1", "      reward: -0.1", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    lines = text.splitlines()
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert message.startswith("3 problem(s)")
    assert f"{path}:{lines.index('  epochs: 0') + 1} (train.epochs)" in message
    assert f"{path}:{lines.index('  batch_max_len: 4096') + 1} (train.batch_max_len)" in message
    assert f"{path}:{lines.index('      reward: -0.1') + 1} (data.sources.1.reward)" in message
