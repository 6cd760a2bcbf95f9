import pytest
from cli_tools import finetune_job

from deploy.entry import build_parser


def finetune(*args, env=None):
    return finetune_job(*args, env=env, timeout=120)


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
        (
            ["train", "--synthetic"],
            {},
            "config key 'output' is required (--output, FINETUNE_OUTPUT or the config file)",
        ),
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
    from job.config import S3_KEYS
    from job.sources import flag_values

    assert flag_values({"s3_read_timeout": "2.5"}, S3_KEYS)["s3_read_timeout"] == 2.5
    assert flag_values({}, S3_KEYS)["s3_max_attempts"] == 5


# --- the CLI explains itself ------------------------------------------------------------------


def _help(capsys, *command):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    import job
    from deploy.entry import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"finetune-job {version('finetune-job')}"
    assert job.__version__ == version("finetune-job")


@pytest.mark.parametrize("command", [(), ("train",), ("prepare",), ("evaluate",)])
def test_help_has_no_restructuredtext_backticks(capsys, command):
    assert "`" not in _help(capsys, *command)


def test_train_help_groups_every_option_by_its_field_group(capsys):
    from job import config

    out = _help(capsys, "train")
    sections = {}
    for block in out.split("\n\n"):
        title, _, body = block.partition(":\n")
        sections[title.strip()] = body
    for name in config.FIELDS:
        group = config.rule(name).group
        assert config.flag(name) in sections[f"{group} options"], (name, group)
    assert [s.removesuffix(" options") for s in sections if s.endswith(" options")] == [
        *config.GROUPS
    ]


def test_train_help_shows_choices_real_defaults_variables_and_required(capsys):
    out = " ".join(_help(capsys, "train").split())  # argparse wraps lines anywhere
    assert "one of: cosine, step; default: cosine [FINETUNE_LR_SCHEDULE]" in out
    assert "one of: auto, never, force; default: auto [FINETUNE_RESUME]" in out
    assert "one of: text, json; default: text" in out
    assert "resnet152_v2; default: resnet18_v2 [FINETUNE_MODEL]" in out
    assert "default: 30,60,90 [FINETUNE_LR_STEPS]" in out
    assert "default: off [FINETUNE_TTA]" in out
    assert "required unless --synthetic [FINETUNE_DATA]" in out
    assert "required [FINETUNE_OUTPUT]" in out
    assert "default: ''" not in out.split("--synthetic")[0]  # not for data/output


def test_train_epilog_explains_variables_and_precedence(capsys):
    out = _help(capsys, "train")
    epilog = out.split("where values come from, highest first:")[1]
    order = ["the options above", "FINETUNE_<KEY>", "--config or FINETUNE_CONFIG", "defaults"]
    positions = [epilog.index(text) for text in order]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochz", "3"], "finetune-job train: error: unrecognized arguments: --epochz"),
        (["train", "--data"], "finetune-job train: error: argument --data: expected one argument"),
        (["prepare", "src"], "finetune-job prepare: error: the following arguments are required"),
        (["prepare", "a", "b", "--resize", "3"], "--resize: must be >= 16 and <= 8192, got 3"),
        (["prepare", "a", "b", "--max-pixels", "0"], "argument --max-pixels: must be >= 1 and"),
        (["prepare", "a", "b", "--val-fraction", "1"], "--val-fraction: must be >= 0 and < 1"),
        (["evaluate", "--data", "d", "--model", "m", "--batch-size", "x"], "expected int, got 'x'"),
        (["nosuch"], "finetune-job: error: argument COMMAND: invalid choice: 'nosuch'"),
        ([], "finetune-job: error: the following arguments are required: COMMAND"),
    ],
    ids=[
        "unknown-option",
        "missing-value",
        "missing-dest",
        "resize",
        "max-pixels",
        "val-fraction",
        "batch-size",
        "unknown-command",
        "no-command",
    ],
)
def test_usage_errors_are_one_line_with_a_help_hint(capsys, argv, message):
    from deploy.entry import main

    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    command = "finetune-job" + (f" {argv[0]}" if argv and argv[0] != "nosuch" else "")
    assert lines[0].endswith(f"(see '{command} --help')")


def test_a_usage_error_in_a_real_process_is_one_line(launch_env):
    result = finetune("train", "--epochz", "3", env=launch_env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "finetune-job train: error: unrecognized arguments: --epochz 3 "
        "(see 'finetune-job train --help')"
    ]


def test_prepare_and_evaluate_read_the_s3_variables_too(monkeypatch):
    from job.config import S3_KEYS
    from job.sources import flag_values

    values = flag_values({}, S3_KEYS, {"FINETUNE_S3_MAX_ATTEMPTS": "7"})
    assert values["s3_max_attempts"] == 7
    with pytest.raises(Exception, match="'s3_read_timeout' from environment variable"):
        flag_values({}, S3_KEYS, {"FINETUNE_S3_READ_TIMEOUT": "inf"})
