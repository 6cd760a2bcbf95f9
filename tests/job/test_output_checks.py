"""Outputs checked at start: --data/--output are a local path or a lowercase s3://bucket/...,
and rank 0 proves the output takes writes before the first step; every rank then stops
with one line, none with a traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from job import config as job_config

SCHEMA = Path(__file__).resolve().parents[2] / "charts" / "finetune-job" / "values.schema.json"
GOOD = [
    "s3://runs/x",
    "s3://r/x",
    "s3://my.bucket-1/a/b",
    "/abs/path",
    "rel/path",
    "./S3:x",
    "out",
    "",
]
BAD = ["S3://runs/x", "s3:/runs/x", "s3:runs", "s3://Runs/x", "s3://-r/x", "gs://b/x", "s3a://b/x"]


@pytest.mark.parametrize("key", ["data", "output"])
@pytest.mark.parametrize("value", GOOD + BAD)
def test_data_and_output_are_a_path_or_a_lowercase_s3_uri_here_and_in_the_schema(key, value):
    prop = json.loads(SCHEMA.read_text())["properties"]["training"]["properties"][key]
    schema_ok = jsonschema.Draft7Validator(prop).is_valid(value)
    try:
        job_config.Config(**{"synthetic": True, "output": "o", key: value})
        config_ok = True
    except job_config.ConfigError as e:
        config_ok = False
        assert f"'{key}'" in str(e) and "\n" not in str(e)
    if key == "output" and value == "":
        return  # required, refused for that reason
    assert config_ok is (value in GOOD)
    assert schema_ok is config_ok  # the chart says the same as the job


def test_a_mistyped_scheme_exits_2_and_writes_nothing(launch_env, tmp_path):
    cmd = ["finetune-job", "train", "--synthetic", "--output", "S3://runs/x"]
    proc = subprocess.run(
        cmd, env=launch_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'output'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def train_cmd(output: str) -> list[str]:
    return [
        *("finetune-job", "train", "--synthetic", "--pretrained", "none"),
        *("--model", "resnet18_v1", "--synthetic-images", "16", "--batch-size", "4"),
        *("--epochs", "1", "--image-size", "32", "--metrics-port", "0", "--log-interval", "1"),
        *("--output", output),
    ]


def unwritable(tmp_path: Path) -> str:
    """A folder that cannot be made, even by root: its parent is a regular file."""
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "out")


def test_one_process_stops_before_the_first_step_when_the_output_is_not_writable(
    launch_env, tmp_path
):
    proc = subprocess.run(
        train_cmd(unwritable(tmp_path)),
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "is not writable" in errors[0] and "a-file/out" in errors[0]
    assert "step 1/" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_bucket_is_found_before_the_first_step(launch_env, s3_env, s3_server):
    env = dict(launch_env, **s3_env)
    proc = subprocess.run(
        train_cmd("s3://no-such-bucket/run"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no-such-bucket" in proc.stderr and "step 1/" not in proc.stderr


def test_a_writable_output_keeps_no_probe(tmp_path):
    from job.storage import Storage

    Storage().probe_writable(str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_every_rank_stops_with_one_line_and_no_traceback(launch_env, launchers, tmp_path):
    cmd = [*launchers["horovodrun"], *train_cmd(unwritable(tmp_path))]
    proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    # One line from each rank (mpirun may run two ranks' lines together).
    assert out.count("finetune-job: error:") == 2, out[-3000:]
    assert out.count("is not writable: Not a directory") == 2


@pytest.mark.slow
def test_a_rank_whose_peer_failed_says_so_in_one_line_without_a_traceback(
    tiny_dataset, launch_env, launchers, tmp_path
):
    """One shard's index no longer matches the manifest: the rank that reads it stops
    naming the shard; a rank left in a broken collective says only that a peer failed."""
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data)
    shard = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    idx = data / shard["idx"]
    idx.write_text("\n".join(idx.read_text().splitlines()[:-2]) + "\n")
    cmd = [
        *launchers["horovodrun"],
        *("finetune-job", "train", "--data", str(data), "--output", str(tmp_path / "out")),
        *("--pretrained", "none", "--model", "resnet18_v1", "--image-size", "32"),
        *("--batch-size", "8", "--epochs", "1", "--metrics-port", "0"),
    ]
    proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out and "Horovod has been shut down" not in out, out[-3000:]
    assert 1 <= out.count("finetune-job: error:") <= 2
    assert f"{shard['idx']}: indexes {shard['count'] - 2} records" in out
