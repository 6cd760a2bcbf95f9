"""Durable, self-checking checkpoints: fsync before the pointer, sizes and digests in the
pointer, fall-back from a bad ``latest``, pruning that keeps to its own run."""

from __future__ import annotations

import json
import logging
import os

import mxnet as mx
import numpy as np
import pytest
from checkpoint_tools import restored_step, small_net, weights

from job.storage import S3Settings, Storage
from job.training.checkpoint import Checkpointer, CheckpointInvalidError, Progress, file_facts


def save_steps(ckpt: Checkpointer, steps: list[int], seed: int = 0) -> dict[int, dict]:
    """Save one checkpoint per step, each with different weights; the weights by step."""
    saved = {}
    for step in steps:
        net, trainer = small_net(seed + step)
        ckpt.write(ckpt.snapshot(net, trainer, Progress(epoch=step, step=step), {"lr": 0.1}))
        saved[step] = weights(net)
    return saved


def folder_of(out: str, step: int) -> str:
    root = os.path.join(out, "checkpoints")
    (name,) = [n for n in os.listdir(root) if n.startswith(f"step-{step:08d}-")]
    return os.path.join(root, name)


def test_the_pointer_lists_each_files_size_and_sha256(tmp_path):
    out = str(tmp_path)
    ckpt = Checkpointer(Storage(), out, keep=3)
    save_steps(ckpt, [5])
    pointer = json.load(open(os.path.join(out, "checkpoints", "latest")))
    folder = os.path.join(out, "checkpoints", pointer["checkpoint"])
    assert pointer["run_id"] == ckpt.run_id and pointer["step"] == 5
    assert set(pointer["files"]) == {"model.params", "trainer.states", "state.json"}
    for part, facts in pointer["files"].items():
        assert facts == file_facts(os.path.join(folder, part))


def test_files_and_folders_are_fsynced_before_the_pointer(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = str(tmp_path)
    save_steps(Checkpointer(Storage(), out, keep=3), [7])
    folder = folder_of(out, 7)
    root = os.path.dirname(folder)
    pointer_at = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith("latest"))
    before = synced[:pointer_at]
    for part in ("model.params", "trainer.states", "state.json", "checkpoint.json"):
        assert os.path.join(folder, part) in before, part
    assert folder in before and root in before  # the folder, and the root's entry for it
    assert synced[pointer_at + 1 :] == [root]  # the pointer's rename made durable


@pytest.mark.parametrize(
    "damage",
    ["missing folder", "partial folder", "truncated file", "altered bytes", "no manifest"],
)
def test_an_invalid_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, damage):
    out = str(tmp_path)
    saved = save_steps(Checkpointer(Storage(), out, keep=5), [1, 2, 3])
    newest = folder_of(out, 3)
    params = os.path.join(newest, "model.params")
    if damage == "missing folder":
        for f in os.listdir(newest):
            os.remove(os.path.join(newest, f))
        os.rmdir(newest)
    elif damage == "partial folder":
        os.remove(os.path.join(newest, "trainer.states"))
    elif damage == "truncated file":
        with open(params, "r+b") as fh:
            fh.truncate(os.path.getsize(params) // 2)
    elif damage == "altered bytes":
        data = bytearray(open(params, "rb").read())
        data[-1] ^= 0xFF
        open(params, "wb").write(bytes(data))
    else:
        os.remove(os.path.join(newest, "checkpoint.json"))
    with caplog.at_level(logging.WARNING, logger="job.training.checkpoint"):
        step, loaded = restored_step(Checkpointer(Storage(), out, keep=5))
    assert step == 2
    for key, value in saved[2].items():
        np.testing.assert_array_equal(loaded[key], value)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and os.path.basename(newest) in warnings[0].getMessage()


def test_load_refuses_a_checkpoint_whose_file_does_not_match(tmp_path):
    out = str(tmp_path)
    save_steps(Checkpointer(Storage(), out, keep=3), [4])
    folder = folder_of(out, 4)
    with open(os.path.join(folder, "state.json"), "a") as fh:
        fh.write(" ")
    net, trainer = small_net()
    with pytest.raises(CheckpointInvalidError, match="state.json has"):
        Checkpointer(Storage(), out, keep=3).load(folder, net, trainer, mx.cpu())


def test_nothing_complete_left_starts_afresh_with_one_warning(tmp_path, caplog):
    out = str(tmp_path)
    save_steps(Checkpointer(Storage(), out, keep=3), [1])
    os.remove(os.path.join(folder_of(out, 1), "model.params"))
    net, trainer = small_net()
    with caplog.at_level(logging.WARNING, logger="job.training.checkpoint"):
        assert Checkpointer(Storage(), out, keep=3).restore(net, trainer, mx.cpu()) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_resumed_run_keeps_its_run_id_and_prunes_its_own_older_checkpoints(tmp_path):
    out = str(tmp_path)
    first = Checkpointer(Storage(), out, keep=2)
    save_steps(first, [1, 2])
    again = Checkpointer(Storage(), out, keep=2)
    restored_step(again)
    assert again.run_id == first.run_id
    save_steps(again, [3])
    steps = sorted(
        n.split("-")[1] for n in os.listdir(os.path.join(out, "checkpoints")) if n != "latest"
    )
    assert steps == ["00000002", "00000003"]


def test_two_runs_sharing_an_output_never_prune_each_others_checkpoints(tmp_path):
    out = str(tmp_path)
    a, b = Checkpointer(Storage(), out, keep=1), Checkpointer(Storage(), out, keep=1)
    for step in (1, 2, 3):
        save_steps(a, [step])
        save_steps(b, [step], seed=100)
    names = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n != "latest")
    assert names == sorted([f"step-00000003-{a.run_id}", f"step-00000003-{b.run_id}"])


def test_on_s3_a_pointer_to_a_partial_folder_falls_back(s3_server, s3_bucket, caplog):
    storage = Storage(S3Settings(endpoint_url=s3_server))
    out = f"{s3_bucket}/run"
    saved = save_steps(Checkpointer(storage, out, keep=3), [1, 2])
    pointer = json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))
    storage.delete_prefix(f"{out}/checkpoints/{pointer['checkpoint']}")
    with caplog.at_level(logging.WARNING, logger="job.training.checkpoint"):
        step, loaded = restored_step(Checkpointer(storage, out, keep=3))
    assert step == 1
    for key, value in saved[1].items():
        np.testing.assert_array_equal(loaded[key], value)
