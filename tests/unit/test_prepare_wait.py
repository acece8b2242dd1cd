"""``crlft prepare --wait``: the nodes other than node 0 wait for its prepared dataset, with a timeout."""

import time

import pytest
from helpers import prepare_recipe, write_recipe

from crlft.errors import UserError
from crlft.prepare import wait_for_prepared
from crlft.recipe import load_recipe


def test_waiting_for_a_dataset_nobody_prepares_times_out_with_what_to_check(tmp_path, tiny_mistral_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_mistral_dir))
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        wait_for_prepared(recipe, timeout_s=0.3, poll_s=0.05, log=lambda _: None)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "(data.output_dir): waited 0.3 s for node 0 to prepare" in message and str(tmp_path / "data") in message
    assert "filesystem every node shares" in message


def test_a_prepared_dataset_ends_the_wait_and_other_inputs_do_not(tmp_path, tiny_mistral_dir):
    path = write_recipe(tmp_path, tiny_mistral_dir)
    prepare_recipe(path)
    lines = []
    assert wait_for_prepared(load_recipe(path), timeout_s=5, log=lines.append) == str(tmp_path / "data")
    assert lines and "prepared by node 0" in lines[0]
    with pytest.raises(UserError):  # the dataset there was made from other inputs: it is not the one to wait for
        wait_for_prepared(load_recipe(path, ["data.sources.1.reward=0.5"]), timeout_s=0.3, poll_s=0.05)


def test_preflight_wait_is_the_wait_and_the_preflight_in_one_process(tmp_path, tiny_mistral_dir, capsys):
    """What launch.sh runs on the nodes other than node 0: the wait's timeout is a refusal (exit 2) naming the
    directory; once the dataset is there, the preflight's answer (0: start training)."""
    from crlft.cli import main

    path = write_recipe(tmp_path, tiny_mistral_dir)
    assert main(["preflight", "--wait", "0.2", path]) == 2
    assert f"waited 0.2 s for node 0 to prepare {tmp_path / 'data'}" in capsys.readouterr().err
    prepare_recipe(path)
    assert main(["preflight", "--wait", "5", path, "--num_gpus", "2"]) == 0
    assert "prepared by node 0" in capsys.readouterr().out
