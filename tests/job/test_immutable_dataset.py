"""Datasets are never changed in place: prepare refuses a non-empty destination unless
--overwrite, which writes a new version's shards and swaps the manifest last; training
checks each shard's size and record count against the manifest before reading it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from job.errors import DataError, InputError
from job.input import prepare as prepare_module
from job.input.prepare import prepare
from job.input.shards import verify_dataset
from job.storage import S3Settings, Storage, StorageError
from job.training import lifecycle

PREP = dict(resize=36, val_fraction=0.2, shard_size=25, workers=1)


def snapshot(root: str) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(d, f), root): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(root)
        for f in files
    }


def manifest_of(root: str) -> dict:
    return json.load(open(os.path.join(root, "manifest.json")))


def shards_of(manifest: dict) -> set[str]:
    return {s["rec"] for split in manifest["splits"].values() for s in split["shards"]}


def test_prepare_refuses_a_non_empty_destination(shape_images, tiny_dataset, tmp_path):
    dest = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset, dest)
    before = snapshot(dest)
    with pytest.raises(InputError, match=r"is not empty .*--overwrite"):
        prepare(shape_images, dest, Storage(), **PREP)
    assert snapshot(dest) == before


def test_the_manifest_carries_each_shards_size_count_and_digest(tiny_dataset):
    from job.input.records import read_index

    for split in manifest_of(tiny_dataset)["splits"].values():
        for shard in split["shards"]:
            rec = os.path.join(tiny_dataset, shard["rec"])
            assert shard["bytes"] == os.path.getsize(rec)
            assert shard["sha256"] == hashlib.sha256(open(rec, "rb").read()).hexdigest()
            idx = open(os.path.join(tiny_dataset, shard["idx"])).read()
            assert shard["count"] == len(read_index(idx))


def test_overwrite_writes_new_shard_names_and_keeps_one_old_version(shape_images, tmp_path):
    dest = str(tmp_path / "ds")
    first = prepare(shape_images, dest, Storage(), **PREP)
    second = prepare(shape_images, dest, Storage(), overwrite=True, seed=1, **PREP)
    assert not shards_of(first) & shards_of(second)
    assert manifest_of(dest) == json.loads(json.dumps(second))
    on_disk = set(snapshot(dest))
    assert shards_of(first) | shards_of(second) <= on_disk  # runs on the old one go on
    verify_dataset(dest, first, Storage())
    third = prepare(shape_images, dest, Storage(), overwrite=True, seed=2, **PREP)
    on_disk = set(snapshot(dest))
    assert shards_of(second) | shards_of(third) <= on_disk
    assert not shards_of(first) & on_disk  # two versions back: gone


class FailingStorage(Storage):
    """Local storage whose n-th shard breaks off after a few records, as an interrupted
    prepare would stop."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.opened, self.fail_at = 0, fail_at

    @contextlib.contextmanager
    def open_write(self, uri: str):
        self.opened += 1
        with super().open_write(uri) as fh:
            yield BreaksOff(fh, uri, writes=3) if self.opened == self.fail_at else fh


class BreaksOff:
    def __init__(self, fh, uri: str, writes: int) -> None:
        self.fh, self.uri, self.writes = fh, uri, writes

    def write(self, data: bytes) -> int:
        self.writes -= 1
        if self.writes < 0:
            raise StorageError(f"{self.uri}: multipart upload failed: connection reset")
        return self.fh.write(data)


def test_an_interrupted_overwrite_leaves_the_old_dataset_whole(shape_images, tmp_path):
    dest = str(tmp_path / "ds")
    first = prepare(shape_images, dest, Storage(), **PREP)
    before = snapshot(dest)
    with pytest.raises(StorageError):
        prepare(shape_images, dest, FailingStorage(fail_at=4), overwrite=True, seed=1, **PREP)
    after = snapshot(dest)
    assert {k: after[k] for k in before} == before  # nothing of the old version changed
    assert not [k for k in after if ".tmp-" in k]  # the broken shard left nothing behind
    assert manifest_of(dest) == json.loads(json.dumps(first))
    verify_dataset(dest, first, Storage())


def test_a_shard_breaking_off_stops_the_workers_promptly(shape_images, tmp_path, monkeypatch):
    """Two workers, each allowed one chunk of images ahead of the writer: the pool still
    shuts down when writing fails (its job feed is released, never left waiting)."""
    monkeypatch.setattr(prepare_module, "WINDOW_CHUNKS_PER_WORKER", 1)
    dest = str(tmp_path / "ds")
    with pytest.raises(StorageError, match="connection reset"):
        prepare(shape_images, dest, FailingStorage(fail_at=2), **dict(PREP, workers=2))
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
    assert not [f for _, _, files in os.walk(dest) for f in files if ".tmp-" in f]


@pytest.mark.parametrize("damage", ["truncated rec", "other idx"])
def test_training_refuses_a_shard_that_does_not_match_the_manifest(
    tiny_dataset, tmp_path, damage, make_config
):
    data = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset, data)
    shard = manifest_of(data)["splits"]["train"]["shards"][1]
    if damage == "truncated rec":
        with open(os.path.join(data, shard["rec"]), "r+b") as fh:
            fh.truncate(shard["bytes"] - 100)
        match = rf"{shard['rec']}: {shard['bytes'] - 100} bytes, the manifest says {shard['bytes']}"
    else:  # a new .idx beside an old .rec: the index no longer has the manifest's count
        idx = os.path.join(data, shard["idx"])
        lines = open(idx).read().splitlines()
        open(idx, "w").write("\n".join(lines[:-3]) + "\n")
        match = rf"{shard['idx']}: indexes {shard['count'] - 3} records, the manifest says"
    with pytest.raises(DataError, match=match):
        lifecycle.run(make_config(data, tmp_path / "out", model="resnet18_v1", epochs=1))


def test_the_prepare_command_refuses_with_one_line_and_overwrites_when_told(
    shape_images, tiny_dataset, tmp_path, launch_env
):
    dest = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset, dest)
    cmd = ["finetune-job", "prepare", shape_images, dest, "--resize", "36", "--workers", "1"]
    refused = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr
    done = subprocess.run(
        [*cmd, "--overwrite"], env=launch_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not shards_of(manifest_of(tiny_dataset)) & shards_of(manifest_of(dest))


def test_overwrite_on_s3(shape_images, s3_server, s3_bucket):
    storage = Storage(S3Settings(endpoint_url=s3_server))
    dest = f"{s3_bucket}/ds"
    first = prepare(shape_images, dest, storage, **PREP)
    with pytest.raises(InputError, match="is not empty"):
        prepare(shape_images, dest, storage, **PREP)
    prepare(shape_images, dest, storage, overwrite=True, **PREP)
    third = prepare(shape_images, dest, storage, overwrite=True, **PREP)
    names = {u[len(dest) + 1 :] for u in storage.list(dest)}
    assert shards_of(third) <= names and not shards_of(first) & names
