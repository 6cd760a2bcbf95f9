"""Bad files and URIs: each is one line naming the file (or shard, record, URI), the bad-input
exit code, no traceback, and nothing half-written.

- a --pretrained file that is text, empty, truncated, or another network's;
- a manifest whose shard paths escape the dataset root, whose counts are negative or not
  whole numbers, or whose class list disagrees with the shards' labels;
- prepare on images over the pixel limit: skipped and counted from the header, never decoded;
- S3 URIs with odd characters: bad buckets refused at start, odd keys work.
"""

from __future__ import annotations

import json
import os
import shutil

import cv2
import mxnet as mx
import numpy as np
import pytest
from cli_tools import finetune_job
from mxnet.gluon.model_zoo import vision

from job.errors import InputError
from job.input import data, prepare
from job.storage import S3Settings, Storage
from job.training import model

EXIT_BAD_INPUT = 2


def finetune(env, *args):
    return finetune_job(*args, env=env)


def assert_one_error_line(result, *needles):
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune-job: error: "), result.stderr
    for needle in needles:
        assert needle in last, last
    # Every other line is a log line (time, level): nothing else reaches stderr.
    for line in result.stderr.strip().splitlines()[:-1]:
        assert " INFO " in line or " WARNING " in line, line


# --- --pretrained files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def params_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("params")

    def saved(name):
        net = vision.get_model(name, classes=4)
        net.initialize()
        net(mx.nd.zeros((1, 3, 32, 32)))
        path = folder / f"{name}.params"
        net.save_parameters(str(path))
        return path

    good = saved("resnet18_v1")
    files = {"good": good, "other-network": saved("resnet34_v2")}
    files["text"] = folder / "text.params"
    files["text"].write_text("this is not a parameters file\n")
    files["empty"] = folder / "empty.params"
    files["empty"].write_bytes(b"")
    files["truncated"] = folder / "truncated.params"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return files


PRETRAINED = {
    "text": "not an MXNet parameters file (30 bytes; empty, truncated or another format)",
    "empty": "not an MXNet parameters file (0 bytes; empty, truncated or another format)",
    "truncated": "not an MXNet parameters file (",
    "other-network": "does not fit resnet18_v1: parameters of another network (the file lacks",
}


@pytest.mark.parametrize("kind", PRETRAINED, ids=list(PRETRAINED))
def test_a_bad_pretrained_file_is_one_line_naming_it(params_files, kind):
    path = str(params_files[kind])
    with pytest.raises(InputError) as info:
        model.load_params_file("resnet18_v1", path, mx.cpu(), Storage())
    message = str(info.value)
    assert message.startswith(f"--pretrained {path}: ") and PRETRAINED[kind] in message
    assert "\n" not in message and "Traceback" not in message


def test_the_good_pretrained_file_loads(params_files):
    net = model.load_params_file("resnet18_v1", str(params_files["good"]), mx.cpu(), Storage())
    assert net.output.weight.shape == (4, 512)


@pytest.mark.slow
def test_a_text_pretrained_file_stops_train_with_one_line(
    params_files, tiny_dataset, launch_env, tmp_path
):
    out = tmp_path / "out"
    pretrained = str(params_files["text"])
    result = finetune(
        launch_env,
        "train",
        "--data",
        tiny_dataset,
        "--output",
        str(out),
        "--model",
        "resnet18_v1",
        "--pretrained",
        pretrained,
        "--metrics-port",
        "0",
        "--image-size",
        "32",
    )
    assert_one_error_line(result, f"--pretrained {pretrained}: not an MXNet parameters file")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


# --- manifests --------------------------------------------------------------------------------


def _manifest(tiny_dataset):
    with open(os.path.join(tiny_dataset, "manifest.json")) as fh:
        return json.load(fh)


def _shard(doc, **change):
    doc["splits"]["train"]["shards"][0].update(change)
    return doc


MANIFESTS = {
    "rec-escapes-root": (
        lambda d: _shard(d, rec="../../etc/passwd"),
        "split 'train' shard 0 'rec' must be a path inside the dataset root, "
        "got '../../etc/passwd'",
    ),
    "idx-absolute": (
        lambda d: _shard(d, idx="/etc/hosts"),
        "split 'train' shard 0 'idx' must be a path inside the dataset root, got '/etc/hosts'",
    ),
    "rec-other-bucket": (
        lambda d: _shard(d, rec="s3://other/x.rec"),
        "'rec' must be a path inside the dataset root, got 's3://other/x.rec'",
    ),
    "negative-count": (
        lambda d: _shard(d, count=-3),
        "split 'train' shard 0: 'count' must be a whole number >= 0, got -3",
    ),
    "fractional-count": (
        lambda d: _shard(d, count=2.5),
        "'count' must be a whole number >= 0, got 2.5",
    ),
    "string-count": (
        lambda d: _shard(d, count="25"),
        "'count' must be a whole number >= 0, got '25'",
    ),
    "one-class": (
        lambda d: {**d, "classes": ["circle"]},
        "'classes' must list 2 or more distinct names, got ['circle']",
    ),
    "repeated-class": (
        lambda d: {**d, "classes": ["a", "a", "b"]},
        "'classes' must list 2 or more distinct names",
    ),
    "no-train-split": (
        lambda d: {**d, "splits": {"val": d["splits"]["val"]}},
        "'splits' must hold at least 'train'",
    ),
    "not-an-object": (lambda d: [d], "not a JSON object"),
}


@pytest.mark.parametrize("name", MANIFESTS, ids=list(MANIFESTS))
def test_a_bad_manifest_is_one_line_naming_the_entry(tiny_dataset, name):
    change, message = MANIFESTS[name]
    doc = change(_manifest(tiny_dataset))
    with pytest.raises(InputError) as info:
        data.parse_manifest(doc, tiny_dataset, "ds/manifest.json")
    assert str(info.value).startswith("ds/manifest.json: not a valid dataset manifest: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_prepared_manifest_parses(tiny_dataset):
    dataset = data.parse_manifest(_manifest(tiny_dataset), tiny_dataset, "m")
    assert dataset.classes == ["circle", "cross", "triangle"] and dataset.count("train") > 0


def _copy_with_manifest(tiny_dataset, tmp_path, doc):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    (root / "manifest.json").write_text(json.dumps(doc))
    return str(root)


def test_labels_outside_the_class_list_stop_the_loader(tiny_dataset, tmp_path):
    """Shards with labels 0..2 and a manifest listing 2 classes: the class list disagrees."""
    doc = _manifest(tiny_dataset)
    doc["classes"] = doc["classes"][:2]
    root = _copy_with_manifest(tiny_dataset, tmp_path, doc)
    dataset = data.load_dataset(root, Storage())
    settings = data.LoaderSettings(batch_size=4, image_size=32, workers=1)
    loader = data.Loader(dataset, "train", settings, 0, 1, Storage(), data.DataStats())
    try:
        with pytest.raises(InputError, match=r"has label 2, but the manifest lists 2 classes"):
            for _ in loader.epoch(0):
                pass
    finally:
        loader.close()


@pytest.mark.slow
def test_a_manifest_escaping_the_root_stops_train_with_one_line(tiny_dataset, launch_env, tmp_path):
    doc = _shard(_manifest(tiny_dataset), rec="../outside.rec")
    root = _copy_with_manifest(tiny_dataset, tmp_path, doc)
    out = tmp_path / "out"
    result = finetune(
        launch_env,
        "train",
        "--data",
        root,
        "--output",
        str(out),
        "--pretrained",
        "none",
        "--metrics-port",
        "0",
    )
    assert_one_error_line(result, "manifest.json: not a valid dataset manifest", "'../outside.rec'")
    assert not out.exists() or not any(out.iterdir())


# --- prepare's pixel limit --------------------------------------------------------------------


@pytest.fixture
def images_with_a_bomb(shape_images, tmp_path):
    """The shape images plus, in one class, a 64-megapixel PNG of ~64 KB (a compression bomb
    in miniature) and a 60x60 JPEG."""
    src = tmp_path / "images"
    shutil.copytree(shape_images, src)
    cv2.imwrite(str(src / "circle" / "bomb.png"), np.zeros((8000, 8000), np.uint8))
    cv2.imwrite(str(src / "cross" / "big.jpg"), np.full((60, 60, 3), 128, np.uint8))
    return src


def test_prepare_skips_and_counts_images_over_the_pixel_limit_without_decoding(
    images_with_a_bomb, tmp_path, monkeypatch
):
    src = images_with_a_bomb
    assert (src / "circle" / "bomb.png").stat().st_size < 1_000_000
    imread = cv2.imread

    def guarded(path, *args):  # the worker processes are forked: they run this too
        assert not path.endswith(("bomb.png", "big.jpg")), f"{path} was decoded"
        return imread(path, *args)

    monkeypatch.setattr(prepare.cv2, "imread", guarded)
    root = tmp_path / "ds"
    manifest = prepare.prepare(
        str(src), str(root), Storage(), resize=36, workers=2, max_pixels=3000
    )
    assert manifest["skipped_over_max_pixels"] == 2
    assert sorted(os.path.basename(p) for p in manifest["skipped_files"]) == ["big.jpg", "bomb.png"]
    total = sum(split["count"] for split in manifest["splits"].values())
    assert total == 120  # every shape image, none of the two
    assert json.loads((root / "manifest.json").read_text())["skipped_over_max_pixels"] == 2


def test_the_default_pixel_limit_is_50_megapixels(images_with_a_bomb, tmp_path):
    manifest = prepare.prepare(
        str(images_with_a_bomb), str(tmp_path / "ds"), Storage(), resize=36, workers=2
    )
    assert manifest["max_pixels"] == 50_000_000
    assert [os.path.basename(p) for p in manifest["skipped_files"]] == ["bomb.png"]
    assert manifest["skipped_over_max_pixels"] == 1


def test_prepare_cli_takes_the_pixel_limit(images_with_a_bomb, tmp_path, launch_env):
    root = tmp_path / "ds"
    result = finetune(
        launch_env, "prepare", str(images_with_a_bomb), str(root), "--resize", "36",
        "--max-pixels", "3000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "big.jpg: 60x60 pixels is over --max-pixels 3000" in result.stderr
    assert "2 files skipped, 2 of them over --max-pixels 3000" in result.stderr


# --- S3 URIs with odd characters --------------------------------------------------------------

BAD_URIS = ["s3://Data_Sets/ds", "s3://my bucket/ds", "s3:///ds", "s3://bucket/d\ns"]


@pytest.mark.parametrize("uri", BAD_URIS, ids=["uppercase", "space", "no-bucket", "newline"])
def test_a_bad_s3_uri_is_refused_at_start_by_every_command(uri, tmp_path, capsys, shape_images):
    from job.cli import main

    commands = [
        ["train", "--data", uri, "--output", str(tmp_path / "out")],
        ["train", "--synthetic", "--output", uri],
        ["train", "--synthetic", "--output", str(tmp_path / "out"), "--pretrained", uri],
        ["prepare", shape_images, uri],
        ["evaluate", "--data", uri, "--model", str(tmp_path)],
    ]
    for argv in commands:
        assert main(argv) == EXIT_BAD_INPUT
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and repr(uri) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_odd_characters_in_an_s3_key_round_trip(s3_server, s3_bucket, tiny_dataset):
    storage = Storage(S3Settings(endpoint_url=s3_server))
    root = f"{s3_bucket}/data sets/flowers #1 (ü)?+&=;"
    from conftest import upload_tree

    upload_tree(tiny_dataset, root, storage)
    dataset = data.load_dataset(root, storage)
    assert dataset.count("train") == data.load_dataset(tiny_dataset, Storage()).count("train")
    shard = dataset.splits["train"][0]
    assert storage.read_bytes(shard.idx_uri)
