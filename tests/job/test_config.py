import argparse

import pytest
import yaml

from job import sources
from job.config import Config, ConfigError


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    sources.add_arguments(parser)
    return sources.load(vars(parser.parse_args(argv)), environ or {})


def test_defaults_need_only_output_and_data():
    cfg = parse(["--data", "d", "--output", "o"])
    assert cfg == Config(data="d", output="o")
    assert cfg.model == "resnet18_v2" and cfg.pretrained == "zoo" and cfg.head_lr_mult == 10


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput: o\nepochs: 3\nlr: 0.5\nbatch_size: 8\n")
    cfg = parse(
        ["--config", str(path), "--epochs", "7"], {"FINETUNE_EPOCHS": "5", "FINETUNE_LR": "0.25"}
    )
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.momentum) == (7, 0.25, 8, 0.9)


def test_config_file_can_come_from_env(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput: o\nseed: 4\n")
    assert parse([], {"FINETUNE_CONFIG": str(path)}).seed == 4


@pytest.mark.parametrize(
    ("argv", "environ", "yaml_text", "message"),
    [
        (
            [],
            {"FINETUNE_EPOCH": "3"},
            "",
            r"unknown config key 'epoch' in environment variable FINETUNE_EPOCH",
        ),
        ([], {}, "epoch: 3\n", r"unknown config key 'epoch' in config file"),
        (
            [],
            {"FINETUNE_EPOCHS": "many"},
            "",
            r"'epochs' from environment variable FINETUNE_EPOCHS: expected int",
        ),
        ([], {}, "epochs: 2.5\n", r"'epochs' from config file .*: expected int, got 2.5"),
        ([], {}, "tta: maybe\n", r"'tta' from config file .*: expected bool"),
        ([], {}, "lr: [1]\n", r"'lr' from config file .*: expected float"),
        (["--lr-steps", "3,x"], {}, "", r"'lr_steps' from --lr-steps: expected a list of int"),
        (
            [],
            {"FINETUNE_MODEL": "vgg16"},
            "",
            r"'model' from environment variable FINETUNE_MODEL: must be one of resnet18_v1",
        ),
        (
            ["--batch-size", "0"],
            {},
            "",
            r"'batch_size' from --batch-size: must be >= 1 and <= 4096, got 0",
        ),
        (
            ["--flip-prob", "1.5"],
            {},
            "",
            r"'flip_prob' from --flip-prob: must be >= 0 and <= 1, got 1.5",
        ),
    ],
    ids=[
        "unknown-env",
        "unknown-yaml",
        "bad-int-env",
        "float-for-int",
        "bad-bool",
        "list-for-float",
        "bad-list-item",
        "bad-choice",
        "batch-zero",
        "probability",
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(tmp_path, argv, environ, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput: o\n" + yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        parse(["--config", str(path), *argv], environ)
    assert "\n" not in str(info.value)


def test_missing_output_and_data_are_named():
    with pytest.raises(ConfigError, match="'output' is required"):
        parse(["--data", "d"])
    with pytest.raises(ConfigError, match="'data' is required"):
        parse(["--output", "o"])
    assert parse(["--output", "o", "--synthetic"]).synthetic


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse(["--config", str(path)])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: No such file"):
        parse(["--config", str(tmp_path / "nope.yaml")])


def test_bool_flags_and_list_values():
    cfg = parse(
        ["--data", "d", "--output", "o", "--tta", "--no-freeze-features", "--lr-steps", "5,8"],
        {"FINETUNE_FP16_ALLREDUCE": "true"},
    )
    assert cfg.tta and not cfg.freeze_features and cfg.fp16_allreduce
    assert cfg.lr_steps == (5, 8)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = parse(["--data", "d", "--output", "o", "--lr-steps", "2,4", "--hue", "0"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert parse(["--config", str(path)]) == cfg


def test_config_is_frozen():
    cfg = Config(data="d", output="o")
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]
