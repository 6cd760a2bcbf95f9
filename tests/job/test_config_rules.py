"""Every rule of every Config key, through every source: flags, FINETUNE_* variables, the
YAML file. A broken rule is one line on stderr naming the key and the source, and exit
code 2; a value on a bound is accepted. Driven in-process through ``job.cli.main`` (the
training itself is replaced by a marker, so an accepted value shows and nothing trains);
test_bad_input_battery_in_real_processes runs a few as real processes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from config_cases import BASE, KEYS, all_bad_cases, edge_values

from job import cli, commands, sources
from job import config as c

EXIT_BAD_INPUT = 2
CASES = all_bad_cases()
TEXT_CASES = [case for case in CASES if case.text is not None]
EDGES = [(key, name, value) for key in KEYS for name, value in edge_values(key)]


class Accepted(Exception):  # noqa: N818 - a marker, not an error
    """The CLI resolved a Config and went on to start training."""


@pytest.fixture
def cli_run(monkeypatch, capsys, tmp_path):
    """Run ``finetune-job`` in this process: (exit code, stderr lines), or Accepted."""
    for var in [v for v in list(__import__("os").environ) if v.startswith(c.ENV_PREFIX)]:
        monkeypatch.delenv(var)

    def accept(threads: int) -> None:
        raise Accepted

    monkeypatch.setattr(commands, "_set_thread_defaults", accept)

    def run(argv: list[str], env: dict[str, str] | None = None, config: dict | None = None):
        for var, value in (env or {}).items():
            monkeypatch.setenv(var, value)
        if config is not None:
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            argv = [*argv, "--config", str(path)]
        code = cli.main(argv)
        return code, capsys.readouterr().err.splitlines()

    return run


def assert_one_line(code: int, lines: list[str], key: str, source: str) -> None:
    assert code == EXIT_BAD_INPUT
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("finetune-job: error: ")
    assert f"config key '{key}'" in line
    if source:
        assert source in line, line
    assert "Traceback" not in line


def _base_flags(key: str) -> list[str]:
    return [arg for k, v in BASE.items() if k != key for arg in (c.flag(k), v)]


@pytest.mark.parametrize("case", TEXT_CASES, ids=[case.id for case in TEXT_CASES])
def test_bad_flag_is_one_line(cli_run, case):
    code, lines = cli_run(["train", *_base_flags(case.key), f"{c.flag(case.key)}={case.text}"])
    if c.hint(case.key) is bool:  # --x / --no-x take no value: a usage error, one line too
        assert code == EXIT_BAD_INPUT and len(lines) == 1, lines
        assert lines[0].startswith("finetune-job train: error: argument " + c.flag(case.key))
        return
    assert_one_line(code, lines, case.key, _source(case, c.flag(case.key)))


@pytest.mark.parametrize("case", TEXT_CASES, ids=[case.id for case in TEXT_CASES])
def test_bad_environment_variable_is_one_line(cli_run, case):
    var = c.env_var(case.key)
    code, lines = cli_run(["train", *_base_flags(case.key)], env={var: case.text})
    assert_one_line(code, lines, case.key, _source(case, f"environment variable {var}"))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_yaml_value_is_one_line(cli_run, case):
    code, lines = cli_run(["train"], config={**BASE, case.key: case.value})
    assert_one_line(code, lines, case.key, _source(case, "config file "))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_mapping_value_names_the_source(case):
    """The function deploy calls for the chart's values: the same rules, its source named."""
    with pytest.raises(c.ConfigError) as info:
        sources.from_mapping({**BASE, case.key: case.value}, "values training")
    message = str(info.value)
    assert "\n" not in message and f"config key '{case.key}'" in message
    assert _source(case, "values training") in message


def _source(case, source: str) -> str:
    # An empty data is found missing after every source is merged: no single source.
    return "" if (case.key, case.kind) == ("data", "empty") else source


@pytest.mark.parametrize(("key", "name", "value"), EDGES, ids=[f"{k}-{n}" for k, n, _ in EDGES])
def test_values_on_a_bound_are_accepted_from_every_source(cli_run, key, name, value):
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    with pytest.raises(Accepted):
        cli_run(["train", *_base_flags(key), f"{c.flag(key)}={text}"])
    with pytest.raises(Accepted):
        cli_run(["train", *_base_flags(key)], env={c.env_var(key): text})
    with pytest.raises(Accepted):
        cli_run(["train"], config={**BASE, key: value})


def test_every_key_has_a_group_help_and_a_bad_case():
    for key in KEYS:
        rule = c.rule(key)
        assert rule.group in c.GROUPS and rule.help and "`" not in rule.help
        assert any(case.key == key for case in CASES), key


def test_the_error_names_value_and_rule():
    with pytest.raises(c.ConfigError) as info:
        sources.from_mapping({**BASE, "shuffle_buffer": 0}, "values training")
    assert str(info.value) == (
        "config key 'shuffle_buffer' from values training: must be >= 1 and <= 10000000, got 0"
    )


def test_lr_steps_in_any_order_mean_the_same_schedule():
    assert sources.from_mapping({**BASE, "lr_steps": [60, 30]}, "x").lr_steps == (30, 60)


def test_config_built_in_code_obeys_the_rules():
    with pytest.raises(c.ConfigError, match="'momentum' from the config: must be >= 0 and < 1"):
        c.Config(data="d", output="o", momentum=1.0)


# A few through a real process: nothing but the one line on stderr, no traceback.
REAL = [
    ("flag", ["--shuffle-buffer", "0"], {}, "'shuffle_buffer' from --shuffle-buffer"),
    ("env", [], {"FINETUNE_LR": "nan"}, "'lr' from environment variable FINETUNE_LR"),
    ("usage", ["--epochz", "3"], {}, "unrecognized arguments: --epochz 3"),
]


@pytest.mark.parametrize(
    ("argv", "env", "message"), [r[1:] for r in REAL], ids=[r[0] for r in REAL]
)
def test_bad_input_battery_in_real_processes(launch_env, tmp_path, argv, env, message):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "job.cli", "train", "--synthetic", "--output", str(out), *argv],
        capture_output=True,
        text=True,
        env={**launch_env, **env},
        timeout=120,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
def test_a_run_on_the_edges_of_the_rules_trains(tiny_dataset, tmp_path, make_config):
    """Values on the bounds that once crashed the job, or could, in one short real run:
    one-record shuffle buffer, smallest crop, batch of one, full jitter, largest seed."""
    from job.training import lifecycle

    cfg = make_config(
        tiny_dataset,
        tmp_path / "out",
        model="resnet18_v1",
        image_size=16,
        batch_size=1,
        epochs=1,
        shuffle_buffer=1,
        momentum=0.0,
        wd=1.0,
        lr_schedule="step",
        lr_steps=(1,),
        lr_decay=1.0,
        warmup_epochs=0.0,
        flip_prob=1.0,
        brightness=1.0,
        contrast=1.0,
        saturation=1.0,
        hue=0.5,
        seed=c.SEED_MAX,
        log_interval=1,
        data_workers=1,
        keep_checkpoints=1,
        tta=True,
        head_lr_mult=0.0,
    )
    summary = lifecycle.run(cfg)
    assert summary is not None and [h["epoch"] for h in summary["history"]] == [1]


def test_a_metrics_port_past_65535_for_a_local_rank_is_one_line():
    """metrics_port 65535 is valid, but local rank 1 would serve on 65536."""
    from job.errors import InputError
    from job.training.metrics import Metrics

    with pytest.raises(
        InputError, match=r"^metrics_port: cannot serve /metrics on 127.0.0.1:65536"
    ):
        Metrics(rank=1).serve("127.0.0.1", 65536)
