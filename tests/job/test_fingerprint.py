"""A resume continues only the same run: model, classes, dataset and the hyper-parameters
that define the run must match the checkpoint's fingerprint, unless ``--resume force``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from job.config import FIELDS
from job.errors import InputError
from job.training import fingerprint, lifecycle

# The run these tests resume: small and synthetic, with Config's own head_lr_mult and warmup
# (the command-line test below gives no such flags, and they are part of the fingerprint).
RUN = dict(
    synthetic=True,
    synthetic_classes=3,
    synthetic_images=16,
    model="resnet18_v1",
    epochs=1,
    data_workers=1,
    head_lr_mult=FIELDS["head_lr_mult"].default,
    warmup_epochs=FIELDS["warmup_epochs"].default,
    log_interval=FIELDS["log_interval"].default,
)


@pytest.fixture(scope="session")
def config(make_config):
    """``config(output, data="", **overrides)``: the RUN into ``output``."""
    return lambda output, data="", **kw: make_config(data, output, **{**RUN, **kw})


def test_the_rules_say_which_keys_define_the_run():
    """What the run learns from is in; where it goes, how long and how it is carried out
    are not (a run resumes with more epochs, on other workers, with other logging)."""
    assert {"model", "pretrained", "lr", "batch_size", "seed", "lr_steps", "hue"} <= set(
        fingerprint.RUN_KEYS
    )
    assert not {"data", "output", "epochs", "threads", "data_workers", "log_format"} & set(
        fingerprint.RUN_KEYS
    )
    assert list(fingerprint.RUN_KEYS) == [k for k in FIELDS if k in fingerprint.RUN_KEYS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, config) -> str:
    """One epoch of a small synthetic run; copied by each test that resumes it."""
    out = str(tmp_path_factory.mktemp("fingerprint") / "run")
    lifecycle.run(config(out))
    return out


@pytest.fixture
def output(trained, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    return out


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"lr": 0.02}, "lr"),
        ({"seed": 1}, "seed"),
        ({"synthetic_classes": 4}, "classes"),  # the class list is compared first
        ({"model": "resnet18_v2"}, "model"),
        ({"batch_size": 4}, "batch_size"),
    ],
    ids=["lr", "seed", "classes", "model", "batch_size"],
)
def test_a_resume_with_another_fingerprint_is_refused_naming_the_first_key(
    output, change, key, config
):
    with pytest.raises(InputError, match=rf"belongs to another run: '{key}' was .*, now "):
        lifecycle.run(config(output, epochs=2, **change))
    assert json.load(open(os.path.join(output, "summary.json")))["epochs"] == 1  # untouched


@pytest.mark.slow
def test_another_dataset_is_another_run(tiny_dataset, tmp_path, config):
    data = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset, data)
    out = str(tmp_path / "run")
    kw = dict(synthetic=False, data=data, model="resnet18_v2")
    lifecycle.run(config(out, **kw))
    manifest = os.path.join(data, "manifest.json")
    doc = json.load(open(manifest))
    json.dump(doc, open(manifest, "w"), indent=4)  # same classes, other bytes
    with pytest.raises(InputError, match="'manifest_sha256' was"):
        lifecycle.run(config(out, epochs=2, **kw))


@pytest.mark.slow
def test_the_same_run_with_more_epochs_and_other_run_control_keys_resumes(output, config):
    first = json.load(open(os.path.join(output, "summary.json")))
    assert first["resumed_from"] is None
    summary = lifecycle.run(config(output, epochs=2, log_interval=1, keep_checkpoints=1, tta=True))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["resumed_from"].startswith(os.path.join(output, "checkpoints", "step-"))


@pytest.mark.slow
def test_resume_force_resumes_another_runs_checkpoint(output, config):
    before = json.load(open(os.path.join(output, "summary.json")))["history"]
    summary = lifecycle.run(config(output, epochs=2, lr=0.02, resume="force"))
    assert summary["history"][0] == before[0]  # epoch 1 came from the checkpoint


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_and_no_traceback(output, launch_env):
    cmd = [
        *("finetune-job", "train", "--synthetic", "--synthetic-classes", "3"),
        *("--synthetic-images", "16", "--pretrained", "none", "--model", "resnet18_v1"),
        *("--image-size", "32", "--batch-size", "8", "--epochs", "2", "--metrics-port", "0"),
        *("--lr", "0.5", "--output", output),
    ]
    proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and "'lr' was 0.01, now 0.5" in errors[0]


@pytest.mark.slow
def test_resume_from_another_output_checks_the_fingerprint_too(output, tmp_path, config):
    other = str(tmp_path / "next")
    with pytest.raises(InputError, match="'lr' was 0.01, now 0.02"):
        lifecycle.run(config(other, epochs=2, lr=0.02, resume_from=output))
    summary = lifecycle.run(config(other, epochs=2, resume_from=output))
    assert summary["resumed_from"].startswith(os.path.join(output, "checkpoints", "step-"))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert os.path.exists(os.path.join(other, "summary.json"))
