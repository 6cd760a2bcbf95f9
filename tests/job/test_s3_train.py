"""prepare → S3 → training with every output on S3 → resume from the S3 checkpoint.

All against moto's S3 server over HTTP on 127.0.0.1; one process in-process, and two
Horovod workers under ``horovodrun`` (slow).
"""

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from job.errors import InputError
from job.input.prepare import prepare
from job.outputs.evaluate import evaluate_export
from job.storage import S3Settings, Storage
from job.training import lifecycle


class RecordingStorage(Storage):
    """Real S3 writes, remembered in order (to see the manifest go last)."""

    def __init__(self, settings, corrupt_suffix=""):
        super().__init__(settings)
        self.written, self.corrupt_suffix = [], corrupt_suffix

    @contextlib.contextmanager
    def open_write(self, uri):
        self.written.append(uri)
        with super().open_write(uri) as fh:
            if self.corrupt_suffix and uri.endswith(self.corrupt_suffix):  # a bad upload
                yield FlipsAByte(fh)
            else:
                yield fh

    def write_bytes(self, uri, data):
        self.written.append(uri)
        super().write_bytes(uri, data)


class FlipsAByte:
    """Flips a byte in the middle of the third write (inside a record's JPEG)."""

    def __init__(self, fh):
        self.fh, self.writes = fh, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
        return self.fh.write(bytes(data))


@pytest.fixture(scope="module")
def s3_dataset(shape_images, s3_server, s3_client):
    """`shape_images` prepared straight into S3 with --verify; (uri, manifest, write order)."""
    s3_client.create_bucket(Bucket="prepared")
    storage = RecordingStorage(S3Settings(endpoint_url=s3_server))
    root = "s3://prepared/ds"
    manifest = prepare(
        shape_images, root, storage, resize=36, val_fraction=0.2, shard_size=25, verify=True
    )
    return root, manifest, storage.written


def test_prepare_writes_shards_to_s3_and_the_manifest_last(s3_dataset, s3_server):
    root, manifest, written = s3_dataset
    assert written[-1] == f"{root}/manifest.json"
    assert f"{root}/train/part-00000.rec" in written and f"{root}/val/part-00000.idx" in written
    storage = Storage(S3Settings(endpoint_url=s3_server))
    assert json.loads(storage.read_bytes(written[-1])) == manifest
    train_split = manifest["splits"]["train"]
    assert train_split["count"] == 96 and len(train_split["shards"]) == 4


def test_verify_catches_a_shard_that_differs_and_writes_no_manifest(
    shape_images, s3_server, s3_bucket
):
    storage = RecordingStorage(S3Settings(endpoint_url=s3_server), corrupt_suffix="part-00001.rec")
    root = f"{s3_bucket}/ds"
    with pytest.raises(InputError, match=r"--verify: s3://.*/train/part-00001.rec: sha256"):
        prepare(shape_images, root, storage, resize=36, shard_size=25, workers=1, verify=True)
    assert not storage.exists(f"{root}/manifest.json")


def test_prepare_into_a_missing_bucket_fails_before_any_work(shape_images, s3_server):
    storage = RecordingStorage(S3Settings(endpoint_url=s3_server))
    with pytest.raises(Exception, match=r"s3://missing-bucket/ds: .*bucket 'missing-bucket'"):
        prepare(shape_images, "s3://missing-bucket/ds", storage, workers=1)
    assert storage.written == []


@pytest.mark.slow
def test_train_with_outputs_on_s3_then_resume_with_more_epochs(
    s3_dataset, s3_server, s3_bucket, make_config
):
    root, _, _ = s3_dataset
    out = f"{s3_bucket}/run"
    storage = Storage(S3Settings(endpoint_url=s3_server))
    first = lifecycle.run(make_config(root, out, s3_endpoint_url=s3_server, epochs=1))
    names = {uri[len(out) + 1 :] for uri in storage.list(out)}
    first_ckpt = (
        "checkpoints/" + json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))["checkpoint"]
    )
    assert first_ckpt.startswith("checkpoints/step-00000012-")
    assert {
        "model.params",
        "model-symbol.json",
        "model-0000.params",
        "summary.json",
        "checkpoints/latest",
        f"{first_ckpt}/model.params",
        f"{first_ckpt}/trainer.states",
        f"{first_ckpt}/state.json",
        f"{first_ckpt}/checkpoint.json",
    } <= names
    assert json.loads(storage.read_bytes(f"{out}/summary.json"))["epochs"] == 1

    second = lifecycle.run(
        make_config(root, out, s3_endpoint_url=s3_server, epochs=2)
    )  # finds the S3 checkpoint
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not trained again
    pointer = json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))
    assert pointer["checkpoint"] == first_ckpt.replace("step-00000012", "step-00000024")[12:]
    assert json.loads(storage.read_bytes(f"{out}/summary.json"))["epochs"] == 2

    result = evaluate_export(root, out, storage)  # the exported model, read back from S3
    assert result["images"] == 24 and 0 <= result["top1"] <= 1


@pytest.mark.slow
def test_two_horovod_workers_train_from_s3_to_s3(
    s3_dataset, s3_server, s3_env, s3_bucket, launch_env
):
    root, _, _ = s3_dataset
    out = f"{s3_bucket}/run2"
    env = dict(launch_env, **s3_env)  # the endpoint from the standard AWS_ENDPOINT_URL
    cmd = [
        *("horovodrun", "-np", "2", "-H", "localhost:2"),
        shutil.which("finetune-job", path=env["PATH"]) or "finetune-job",
        "train",
        *("--data", root, "--output", out, "--pretrained", "none", "--head-lr-mult", "1"),
        *("--image-size", "32", "--batch-size", "8", "--epochs", "2", "--metrics-port", "0"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    storage = Storage(S3Settings(endpoint_url=s3_server))
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["workers"] == 2 and summary["global_batch_size"] == 16
    digests = summary["params_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert storage.exists(f"{out}/model-symbol.json") and storage.exists(f"{out}/model.params")
    pointer = json.loads(storage.read_bytes(f"{out}/checkpoints/latest"))
    assert pointer["checkpoint"].startswith("step-00000012-")  # 6 steps × 2 epochs
    # Rank 0's hand-over, read from and written to S3: ONNX checked, eval of the whole val split.
    assert summary["onnx"]["max_abs_diff"] <= 1e-4
    assert json.loads(storage.read_bytes(f"{out}/eval.json"))["images"] == 24
    for name in ("model.onnx", "triton/finetune/config.pbtxt", "report.html", "history.csv"):
        assert storage.exists(f"{out}/{name}"), name
    assert os.environ.get("AWS_ENDPOINT_URL") is None  # only the workers got it


@pytest.mark.slow
def test_prepare_command_to_s3_with_verify(shape_images, s3_server, s3_env, s3_bucket, launch_env):
    env = dict(launch_env, **s3_env)
    del env["AWS_ENDPOINT_URL"]  # from the flag this time
    dest = f"{s3_bucket}/cli"
    cmd = ["finetune-job", "prepare", shape_images, dest, "--resize", "36", "--verify"]
    s3_flags = ["--s3-endpoint-url", s3_server, "--s3-max-attempts", "3", "--s3-read-timeout", "5"]
    result = subprocess.run([*cmd, *s3_flags], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "verified every shard" in result.stderr
    manifest = json.loads(
        Storage(S3Settings(endpoint_url=s3_server)).read_bytes(f"{dest}/manifest.json")
    )
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 120

    missing = subprocess.run(
        [*cmd[:3], "s3://no-such-bucket/ds", *s3_flags], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "finetune-job: error: s3://no-such-bucket/ds: HEAD bucket failed: "
        "bucket 'no-such-bucket' does not exist"
    )
