"""Verified checkpoints without DeepSpeed: the manifest ``COMPLETE`` holds, what damage it finds, ``train.resume``
over damaged checkpoints, ``keep_last`` counting only intact ones, pickles that would run code, RNG files in JSON,
and a full disk during a save (a real tmpfs; skipped where mounting is not allowed).
"""

import builtins
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from crlft import checkpoint as ckpt
from crlft import manifest
from crlft.errors import UserError


class _FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes, with the same ``torch.save``: a model file and a ZeRO shard
    per rank (``ranks`` simulated in one process)."""

    def __init__(self, ranks=(0,), numel=1000):
        self.ranks, self.numel = ranks, numel

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        directory = os.path.join(save_dir, tag)
        os.makedirs(directory, exist_ok=True)
        torch.save({"module": {"w": torch.arange(self.numel, dtype=torch.float32)}},
                   os.path.join(directory, "mp_rank_00_model_states.pt"))
        for r in self.ranks:
            torch.save({"optimizer_state_dict": {"exp_avg": torch.full((self.numel,), float(r))}},
                       os.path.join(directory, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))


def _save(out, step, keep_last=2, engine=None):
    return ckpt.save_checkpoint(engine or _FakeEngine(), str(out), step, {"step": step, "fingerprint": {}},
                                hf_files=os.makedirs, keep_last=keep_last, rank=0, barrier=lambda: None)


def _flip(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _remanifest(path):
    """What an attacker (or damage before the save) leaves: files and manifest that agree."""
    marker = manifest.read_marker(path)
    ckpt.write_json(os.path.join(path, manifest.COMPLETE_MARKER), {"step": marker["step"],
                                                                   **manifest.build_manifest(path)})


# --------------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------------


def test_complete_holds_size_and_hash_of_every_file_of_every_rank(tmp_path):
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / "sub").mkdir()
    for name, size in (("a.bin", 5000), ("b.pt", 300), ("sub/c.json", 70), ("d", 4000)):
        (directory / name).write_bytes(os.urandom(size))
    for rank in (1, 0):  # each rank hashes its share, balanced by size
        manifest.write_partial_manifest(str(directory), rank, 2)
    partial = {r: json.loads((directory / f".manifest_rank{r}.json").read_text()) for r in (0, 1)}
    assert sorted(partial[0]) == ["a.bin"] and sorted(partial[1]) == ["b.pt", "d", "sub/c.json"]
    built = manifest.build_manifest(str(directory))
    assert not [n for n in os.listdir(directory) if n.startswith(".manifest_rank")]
    assert built["hash"] == "xxh3_128" and sorted(built["files"]) == ["a.bin", "b.pt", "d", "sub/c.json"]
    for rel, entry in built["files"].items():
        assert entry == {"size": os.path.getsize(directory / rel), "hash": manifest.file_hash(str(directory / rel))}


def test_save_checkpoint_writes_the_manifest_and_verification_finds_each_kind_of_damage(tmp_path):
    path = _save(tmp_path, 4, engine=_FakeEngine(ranks=(0, 1)))
    marker = manifest.read_marker(path)
    assert marker["step"] == 4 and set(marker["files"]) == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_rank0.json", "trainer_state.json"}
    assert ckpt.verify_checkpoint(path) == []
    shard = os.path.join(path, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    original = open(shard, "rb").read()

    _flip(shard)
    assert ckpt.verify_checkpoint(path) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt: contents differ from the "
                                            "manifest (hash)"]
    _truncate(shard)
    assert ckpt.verify_checkpoint(path) == [f"zero_pp_rank_1_mp_rank_00_optim_states.pt: {len(original) // 2} bytes, "
                                            f"the manifest says {len(original)}"]
    os.remove(shard)
    assert ckpt.verify_checkpoint(path) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"]
    open(shard, "wb").write(original)
    open(os.path.join(path, "extra.pt"), "wb").write(b"x")
    assert ckpt.verify_checkpoint(path) == ["extra.pt: not in the manifest (not written by this run)"]
    os.remove(os.path.join(path, "extra.pt"))
    assert ckpt.verify_checkpoint(path) == []


def test_auto_resume_skips_a_damaged_newest_checkpoint_with_a_message(tmp_path, caplog):
    older = _save(tmp_path, 4)
    newest = _save(tmp_path, 8)
    _truncate(os.path.join(newest, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert ckpt.resolve_resume("auto", str(tmp_path)) == older
    assert f"{newest} is damaged, skipping it: zero_pp_rank_0_mp_rank_00_optim_states.pt:" in caplog.text
    assert f"resuming from {older}, the newest intact checkpoint" in caplog.text
    assert os.path.isdir(newest + ".damaged")  # kept for inspection, never resumed or counted again
    assert ckpt.list_checkpoints(str(tmp_path)) == [(4, older)]
    _truncate(os.path.join(older, "trainer_state.json"))
    with pytest.raises(UserError, match="every checkpoint is damaged"):
        ckpt.resolve_resume("auto", str(tmp_path))


def test_resume_from_a_damaged_path_stops_naming_it_and_the_newest_intact_one(tmp_path):
    older = _save(tmp_path, 4, keep_last=3)
    _save(tmp_path, 6, keep_last=3)
    newest = _save(tmp_path, 8, keep_last=3)
    _flip(os.path.join(ckpt.checkpoints_dir(str(tmp_path)), "step_00000006", "mp_rank_00_model_states.pt"))
    _flip(os.path.join(newest, "mp_rank_00_model_states.pt"))
    with pytest.raises(UserError) as error:
        ckpt.resolve_resume(newest, str(tmp_path))
    message = str(error.value)
    assert f"train.resume: {newest} is damaged: mp_rank_00_model_states.pt: contents differ" in message
    assert f"The newest intact checkpoint beside it is {older}" in message
    assert os.path.isdir(newest)  # the user's own choice: nothing renamed


def test_keep_last_counts_only_intact_checkpoints(tmp_path):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    _truncate(os.path.join(second, "mp_rank_00_model_states.pt"))
    _save(tmp_path, 3)  # keep_last 2: the new one and the newest *intact* older one, step 1
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1, 2, 3]
    assert ckpt.verify_checkpoint(first) == []
    _save(tmp_path, 4)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4]


# --------------------------------------------------------------------------------------------------------------
# Nothing loaded runs code
# --------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes a file: the proof that a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("manifest_rewritten", [False, True])
def test_a_pickle_payload_is_refused_without_running(tmp_path, manifest_rewritten):
    path = _save(tmp_path, 4)
    ran = tmp_path / "payload_ran"
    torch.save({"module": _Payload(str(ran))}, os.path.join(path, "mp_rank_00_model_states.pt"))
    if manifest_rewritten:
        _remanifest(path)
    problems = ckpt.verify_checkpoint(path)
    assert len(problems) == 1 and problems[0].startswith("mp_rank_00_model_states.pt: ")
    if manifest_rewritten:
        assert "refused without loading it: its pickle would build exec" in problems[0]
    with pytest.raises(UserError, match="is damaged"):
        ckpt.resolve_resume(path, str(tmp_path))
    from crlft.export import export_checkpoint

    with pytest.raises(UserError, match="is damaged, not exported: mp_rank_00_model_states.pt"):
        export_checkpoint(path, str(tmp_path / "export"))
    assert not ran.exists() and not (tmp_path / "export").exists()
    torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), weights_only=False)  # the payload is real
    assert ran.exists()


def test_rng_state_is_json_and_round_trips(tmp_path):
    path = _save(tmp_path, 1)
    with open(os.path.join(path, "rng_state_rank0.json"), encoding="utf-8") as f:
        assert set(json.load(f)) == {"python", "numpy", "torch", "cuda"}
    expected = (torch.rand(3), random.random(), np.random.rand())
    from crlft.rng import read_rng_file

    ckpt.set_rng_state(read_rng_file(path, 0))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


# --------------------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs mount rights: root with CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_names_the_path_and_the_last_good_checkpoint(small_tmpfs):
    out = small_tmpfs / "run"
    first = _save(out, 1, engine=_FakeEngine(numel=150_000))  # ~1.2 MB of 2: fits
    with pytest.raises(UserError) as error:
        _save(out, 2, engine=_FakeEngine(numel=150_000))  # does not fit beside the first
    message = str(error.value)
    tmp = os.path.join(ckpt.checkpoints_dir(str(out)), "step_00000002.tmp")
    assert message.startswith(f"no space left on device at {tmp} while saving a checkpoint")
    assert f"The last good checkpoint is {first}." in message
    assert ckpt.list_checkpoints(str(out)) == [(1, first)] and ckpt.verify_checkpoint(first) == []


def test_disk_full_is_recognised_from_torchs_writer_message(tmp_path):
    assert manifest.is_disk_full(OSError(28, "No space left on device"), str(tmp_path))
    assert not manifest.is_disk_full(RuntimeError("unexpected pos 576 vs 534"), str(tmp_path))  # this disk has room


# --------------------------------------------------------------------------------------------------------------
# Exports are checked for non-finite weights
# --------------------------------------------------------------------------------------------------------------


def _stage0_checkpoint(tmp_path, poison: bool) -> str:
    """A ZeRO stage-0 checkpoint of a tiny Mistral (module weights in mp_rank_00_model_states.pt)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    if poison:
        state["model.model.norm.weight"][1] = float("nan")
    path = os.path.join(ckpt.checkpoints_dir(str(tmp_path)), "step_00000003")
    os.makedirs(path)
    model.config.save_pretrained(os.path.join(path, "hf"))
    torch.save({"module": state}, os.path.join(path, "mp_rank_00_model_states.pt"))
    ckpt.write_json(os.path.join(path, "trainer_state.json"), {"version": ckpt.TRAINER_STATE_VERSION, "step": 3,
                                                               "zero_stage": 0, "dtype": "float32",
                                                               "param_prefix": "model."})
    ckpt.write_json(os.path.join(path, "COMPLETE"), {"step": 3, **manifest.build_manifest(path)})
    return path


@pytest.mark.parametrize("poison", [False, True])
def test_an_export_with_nonfinite_weights_is_refused_before_it_is_written(tmp_path, poison):
    from crlft.export import export_checkpoint

    path = _stage0_checkpoint(tmp_path, poison)
    out = str(tmp_path / "export")
    if not poison:
        export_checkpoint(path, out, log=lambda _: None)
        assert os.path.isfile(os.path.join(out, "model.safetensors"))
        return
    with pytest.raises(UserError, match=r"1 weight tensor\(s\) hold NaN or infinity \(model.norm.weight\); nothing "
                                        r"exported"):
        export_checkpoint(path, out, log=lambda _: None)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
