"""The README stays true: its recipe reference is the config's, and its test command is what CI runs."""

import os
import re

from helpers import REPO_ROOT as ROOT

from crlft.config import recipe_reference


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_recipe_reference_matches_the_config():
    readme = read("README.md")
    section = re.search(r"<!-- recipe-reference:start -->\n(.*)\n<!-- recipe-reference:end -->", readme, re.S)
    assert section, "README.md lost its recipe-reference markers"
    assert section.group(1).strip() == recipe_reference().strip(), (
        "README's recipe reference is stale: paste crlft.config.recipe_reference() between the markers"
    )


def test_ci_runs_the_readme_test_command():
    ci = read(".ci/run")
    command = "./install.sh --dev && python -m pytest -q"
    assert command in ci.splitlines()
    assert command in read("README.md")
    assert "./install.sh && ./launch.sh recipes/demo.yaml" in read("README.md")
