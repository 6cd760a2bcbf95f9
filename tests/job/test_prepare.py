import hashlib
import json
import os

import cv2
import numpy as np
import pytest
from mxnet import recordio

from job.errors import InputError
from job.input.prepare import prepare
from job.input.records import RecordStream
from job.storage import Storage


def records(path):
    with open(path, "rb") as fh:
        return [recordio.unpack(r.payload) for r in RecordStream(path, fh)]


def test_round_trip_records_labels_manifest_and_checksums(shape_images, tiny_dataset):
    manifest = json.load(open(os.path.join(tiny_dataset, "manifest.json")))
    assert manifest["classes"] == ["circle", "cross", "triangle"]
    total = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["count"] == sum(s["count"] for s in info["shards"])
        for shard in info["shards"]:
            path = os.path.join(tiny_dataset, shard["rec"])
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
            assert os.path.exists(os.path.join(tiny_dataset, shard["idx"]))
            recs = records(path)
            assert len(recs) == shard["count"] <= 25
            for header, jpeg in recs:
                img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                assert min(img.shape[:2]) == 36  # shorter side resized, nothing cropped
                assert 0 <= int(header.label) < 3
        total += info["count"]
    assert total == 120
    assert manifest["splits"]["val"]["count"] == 24  # 20 % of each class


def test_labels_match_the_class_folders(tmp_path):
    src = tmp_path / "src"
    colours = {"blue": (255, 0, 0), "green": (0, 255, 0), "red": (0, 0, 255)}
    for name, bgr in colours.items():
        (src / name).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(src / name / f"{i}.png"), np.full((30, 50, 3), bgr, np.uint8))
    prepare(str(src), str(tmp_path / "ds"), Storage(), resize=20, val_fraction=0.25, workers=1)
    manifest = json.load(open(tmp_path / "ds" / "manifest.json"))
    for header, jpeg in records(str(tmp_path / "ds" / "train" / "part-00000.rec")):
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[:2] == (20, 33)  # 30x50 → shorter side 20, aspect kept
        name = manifest["classes"][int(header.label)]
        np.testing.assert_allclose(img.mean(axis=(0, 1)), colours[name], atol=3)


def test_split_is_deterministic_for_a_seed(shape_images, tmp_path):
    a = prepare(shape_images, str(tmp_path / "a"), Storage(), resize=24, seed=3, workers=2)
    b = prepare(shape_images, str(tmp_path / "b"), Storage(), resize=24, seed=3, workers=2)
    c = prepare(shape_images, str(tmp_path / "c"), Storage(), resize=24, seed=4, workers=2)
    sums = [[s["sha256"] for s in m["splits"]["val"]["shards"]] for m in (a, b, c)]
    assert sums[0] == sums[1] != sums[2]


def test_small_images_are_enlarged(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        cv2.imwrite(str(src / name / "x.jpg"), np.zeros((10, 16, 3), np.uint8))
    prepare(str(src), str(tmp_path / "ds"), Storage(), resize=64, val_fraction=0)
    (_, jpeg), _ = records(str(tmp_path / "ds" / "train" / "part-00000.rec"))
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape[:2] == (64, 102)


def test_unreadable_image_is_skipped_and_named(tmp_path, caplog):
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        cv2.imwrite(str(src / name / "ok.jpg"), np.zeros((20, 20, 3), np.uint8))
    (src / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    manifest = prepare(str(src), str(tmp_path / "ds"), Storage(), resize=16, val_fraction=0)
    assert manifest["splits"]["train"]["count"] == 2
    assert manifest["skipped_files"] == [str(src / "a" / "broken.jpg")]
    assert "broken.jpg" in caplog.text


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "needs at least 2 class folders"),
        ({"a": 1, "b": 0}, r"class folder .*b has no images"),
    ],
    ids=["empty", "empty-class"],
)
def test_bad_source_folders_are_named(tmp_path, layout, message):
    for name, n in layout.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / name / f"{i}.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match=message):
        prepare(str(tmp_path), str(tmp_path / "out"), Storage())


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        prepare(str(tmp_path / "nope"), str(tmp_path / "out"), Storage())


def test_ends_with_per_class_counts_without_skipped_files(tmp_path, caplog):
    import io
    import logging

    src = tmp_path / "src"
    for name, count in (("a", 3), ("b", 5)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(src / name / f"{i}.jpg"), np.zeros((20, 20, 3), np.uint8))
    (src / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    caplog.set_level(logging.INFO, logger="job.input.prepare")
    shown = io.StringIO()  # not a terminal: no bar, lines only every 30 s
    dest = str(tmp_path / "ds")
    prepare(str(src), dest, Storage(), resize=16, val_fraction=0.2, progress_stream=shown)
    assert shown.getvalue() == ""
    last = [r.getMessage() for r in caplog.records if r.name == "job.input.prepare"][-1]
    # a: 4 files (1 unreadable) -> 1 val + 2 train or 2 + 1; b: 5 -> 1 val, 4 train
    assert last.startswith("prepare: images per class: a ")
    counts = dict(
        (part.split()[0], (int(part.split()[1]), int(part.split()[4])))
        for part in last.split(": ", 2)[2].split(", ")
    )
    assert sum(counts["a"]) == 3 and counts["b"] == (4, 1)


@pytest.mark.parametrize(
    ("shorter", "factor"), [(2048, 8), (1500, 4), (600, 2), (511, 1), (256, 1), (100, 1)]
)
def test_big_jpegs_are_decoded_at_a_reduced_size_that_still_covers_the_resize(
    tmp_path, shorter, factor
):
    """libjpeg's DCT scaling by the largest of 1/8, 1/4, 1/2 that keeps >= resize pixels;
    the result has the same size as a full decode and is the same picture."""
    import cv2
    import numpy as np

    from job.input.prepare import encode, reduced_decode_flag

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)
    img = cv2.resize(small, (shorter * 3 // 2, shorter), interpolation=cv2.INTER_CUBIC)
    path = str(tmp_path / "big.jpg")
    cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}
    flags.update({4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8})
    assert reduced_decode_flag(path, shorter, 256) == flags[factor]
    out = cv2.imdecode(np.frombuffer(encode((path, 256, 95, 10**9)), np.uint8), cv2.IMREAD_COLOR)
    full = cv2.imread(path, cv2.IMREAD_COLOR)
    scale = 256 / shorter
    shape = (max(256, round(full.shape[1] * scale)), max(256, round(full.shape[0] * scale)))
    area = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    expected = cv2.resize(full, shape, interpolation=area)
    assert out.shape == expected.shape and min(out.shape[:2]) == 256
    # The same smooth picture: JPEG re-encoding and DCT scaling move pixels by a few levels.
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4


def test_a_png_is_decoded_whole(tmp_path):
    import cv2
    import numpy as np

    from job.input.prepare import reduced_decode_flag

    path = str(tmp_path / "big.png")
    cv2.imwrite(path, np.zeros((2048, 2048, 3), np.uint8))
    assert reduced_decode_flag(path, 2048, 256) == cv2.IMREAD_COLOR


def test_the_workers_stay_a_bounded_window_ahead_of_the_writer():
    """However slow the writer (an upload), at most the window's images are encoded and
    waiting: memory does not grow with the dataset."""
    import contextlib
    import multiprocessing
    import time

    from job.input.prepare import _Window

    window, fed = _Window(chunks=4, chunk=3), []

    def jobs():
        for i in range(61):  # the last chunk is short
            fed.append(i)
            yield i

    with multiprocessing.get_context("fork").Pool(2) as pool, contextlib.closing(window):
        for _ in range(2):  # the slots come back whole, split after split
            fed.clear()
            results = window.results(pool.imap(abs, window.feed(jobs()), chunksize=3))
            for taken, result in enumerate(results, 1):
                assert result == taken - 1
                # 4 chunks ahead of the chunk being taken, + 1 job waiting for a slot
                assert len(fed) <= (taken + 2) // 3 * 3 + 4 * 3 + 1
                time.sleep(0.002)
            assert len(fed) == 61
