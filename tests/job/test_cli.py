import subprocess
import sys

import pytest

from job.cli import build_parser


def finetune(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "job.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "command",
    ["train", "prepare", "evaluate", "predict", "export", "submit", "status", "logs", "delete"],
)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_train_help_lists_every_config_key(capsys):
    from job.config import FIELDS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["train", "--output", "o", "--synthetic", "--epochs", "x"],
            {},
            "config key 'epochs' from --epochs: expected int, got 'x'",
        ),
        (["train", "--synthetic"], {}, "config key 'output' is required"),
        (
            ["train", "--output", "o", "--synthetic"],
            {"FINETUNE_EPOHCS": "3"},
            "unknown config key 'epohcs' in environment variable FINETUNE_EPOHCS",
        ),
    ],
    ids=["bad-type", "missing-output", "unknown-env"],
)
def test_bad_config_exits_2_with_one_line(launch_env, args, env, message):
    result = finetune(*args, env={**launch_env, **env})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"finetune-job: error: {message}"]


def test_missing_dataset_exits_2_naming_the_manifest(launch_env, tmp_path):
    result = finetune(
        "train",
        "--data",
        str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "o"),
        "--pretrained",
        "none",
        "--metrics-port",
        "0",
        env=launch_env,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"finetune-job: error: {tmp_path / 'nope' / 'manifest.json'}: no dataset "
        "manifest (run `finetune-job prepare` first)"
    )
    assert "Traceback" not in result.stderr


def test_prepare_then_evaluate_through_the_cli(launch_env, shape_images, tmp_path):
    ds = str(tmp_path / "ds")
    result = finetune("prepare", shape_images, ds, "--resize", "36", "--verify", env=launch_env)
    assert result.returncode == 0, result.stderr
    assert "verified every shard" in result.stderr
    result = finetune("evaluate", "--data", ds, "--model", str(tmp_path / "none"), env=launch_env)
    assert result.returncode == 2 and "not a finished training run" in result.stderr


def test_prepare_takes_the_s3_keys_of_the_config_typed(launch_env, shape_images, tmp_path):
    result = finetune(
        "prepare", shape_images, str(tmp_path / "ds"), "--s3-max-attempts", "many", env=launch_env
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "finetune-job: error: config key 's3_max_attempts' from --s3-max-attempts: "
        "expected int, got 'many'"
    )
    from job.config import S3_KEYS, flag_values

    assert flag_values({"s3_read_timeout": "2.5"}, S3_KEYS)["s3_read_timeout"] == 2.5
    assert flag_values({}, S3_KEYS)["s3_max_attempts"] == 5
