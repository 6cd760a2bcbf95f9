"""End to end under real launchers: 2 Horovod workers fine-tune a pretrained model."""

import json
import os
import subprocess

import pytest

from job import train
from job.config import Config

pytestmark = pytest.mark.slow

COMMON = [
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--epochs",
    "3",
    "--lr",
    "0.002",
    "--metrics-port",
    "0",
    "--log-interval",
    "4",
    "--tta",
]


@pytest.fixture(scope="module")
def source_model(tiny_dataset, tmp_path_factory):
    """A source model trained from scratch in one process (its head has 3 classes too)."""
    out = str(tmp_path_factory.mktemp("source"))
    train.run(
        Config(
            data=tiny_dataset,
            output=out,
            pretrained="none",
            head_lr_mult=1,
            image_size=32,
            batch_size=8,
            epochs=2,
            lr=0.01,
            metrics_port=0,
        )
    )
    return os.path.join(out, "model.params")


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_two_workers_fine_tune_to_far_above_chance(
    launcher, launchers, tiny_dataset, source_model, launch_env, tmp_path
):
    out = str(tmp_path / "out")
    cmd = [
        *launchers[launcher],
        "finetune-job",
        "train",
        "--data",
        tiny_dataset,
        "--output",
        out,
        "--pretrained",
        source_model,
        *COMMON,
    ]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["workers"] == 2 and summary["global_batch_size"] == 16
    assert summary["val_top1"] >= 0.8  # chance is 1/3
    assert summary["val_top1_tta"] >= 0.8
    digests = summary["params_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # ranks end identical
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["train_images_per_second"] > 0 and summary["wall_seconds"] > 0
    assert result.stderr.count("epoch 3/3 done") == 1  # only rank 0 logs progress

    evaluated = subprocess.run(
        ["finetune-job", "evaluate", "--data", tiny_dataset, "--model", out],
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    top1 = float(evaluated.stdout.split("top1=")[1].split()[0])
    assert top1 == pytest.approx(summary["val_top1"], abs=1e-6)  # the export is the model
