import collections
import itertools
import random

import numpy as np
import pytest

from job.errors import InputError
from job.input.data import (
    DataStats,
    Loader,
    LoaderSettings,
    Shard,
    assign_shards,
    load_dataset,
    shuffled,
)
from job.storage import Storage


def shards(counts):
    return [Shard(f"s{i}.rec", f"s{i}.idx", c) for i, c in enumerate(counts)]


def records_of(pieces):
    return [(p.shard.uri, r) for p in pieces for r in range(p.start, p.stop)]


@pytest.mark.parametrize(
    ("counts", "size"),
    [
        ([100, 100, 100, 100], 2),
        ([100, 37, 250, 5, 61], 3),
        ([10, 10], 5),
        ([7], 4),
        ([1000, 1, 1, 1], 8),
        ([3, 3, 3], 9),
    ],
    ids=["even", "uneven", "more-ranks-than-shards", "one-shard", "skewed", "one-record-each"],
)
@pytest.mark.parametrize("epoch", [0, 3])
def test_shares_are_disjoint_complete_and_balanced(counts, size, epoch):
    all_shards = shards(counts)
    shares = [records_of(assign_shards(all_shards, r, size, epoch, seed=1)) for r in range(size)]
    flat = [rec for share in shares for rec in share]
    assert len(flat) == len(set(flat)) == sum(counts)  # disjoint and complete
    lengths = [len(s) for s in shares]
    assert max(lengths) - min(lengths) <= 1  # balanced


def test_shard_order_is_reshuffled_each_epoch_and_the_same_on_every_rank():
    all_shards = shards([10] * 16)
    orders = [[p.shard.uri for p in assign_shards(all_shards, 0, 1, e, seed=5)] for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4
    assert assign_shards(all_shards, 1, 4, 2, seed=5) == assign_shards(all_shards, 1, 4, 2, seed=5)


def test_validation_keeps_shard_order():
    all_shards = shards([5, 5, 5])
    pieces = assign_shards(all_shards, 0, 1, epoch=9, seed=3, shuffle=False)
    assert [p.shard.uri for p in pieces] == ["s0.rec", "s1.rec", "s2.rec"]


def test_streaming_shuffle_is_a_permutation():
    items = list(range(1000))
    out = list(shuffled(iter(items), 64, random.Random(0)))
    assert sorted(out) == items and out != items


def settings(**kw):
    base = dict(batch_size=8, image_size=32, seed=0, workers=2)
    base.update(kw)
    return LoaderSettings(**base)


def labels_seen(loader, epoch=0):
    return [int(x) for b in loader.epoch(epoch) for x in b.label[: b.valid]]


def test_train_loader_gives_full_batches_of_augmented_images(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())
    loader = Loader(ds, "train", settings(), 0, 1, Storage(), DataStats())
    batches = list(loader.epoch(0))
    loader.close()
    assert len(batches) == loader.steps_per_epoch == ds.count("train") // 8
    for b in batches:
        assert b.data.shape == (8, 3, 32, 32) and b.data.dtype == np.float32 and b.valid == 8
        assert np.isfinite(b.data).all() and b.data.std() > 0.1
    assert set(int(x) for b in batches for x in b.label) == {0, 1, 2}


def test_ranks_see_disjoint_records_each_epoch(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())
    per_rank = []
    for rank in range(2):
        stats = DataStats()
        loader = Loader(ds, "val", settings(), rank, 2, Storage(), stats, train=False)
        per_rank.append(labels_seen(loader))
        loader.close()
    assert sum(len(x) for x in per_rank) == ds.count("val")
    counts = collections.Counter(per_rank[0] + per_rank[1])
    assert sum(counts.values()) == ds.count("val")


def test_eval_loader_covers_every_record_once_with_a_padded_last_batch(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())
    loader = Loader(ds, "val", settings(batch_size=7, tta=True), 0, 1, Storage(), DataStats())
    batches = list(loader.epoch(0))
    loader.close()
    assert sum(b.valid for b in batches) == ds.count("val")
    assert batches[-1].five.shape == (7, 5, 3, 32, 32)
    last = batches[-1]
    assert np.abs(last.data[last.valid :]).sum() == 0  # padding rows are at the end


def test_epochs_are_deterministic_and_differ_between_epochs(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())

    def first_batch(epoch):
        loader = Loader(ds, "train", settings(), 0, 1, Storage(), DataStats())
        batch = next(iter(loader.epoch(epoch)))
        loader.close()
        return batch.data.copy()

    np.testing.assert_array_equal(first_batch(1), first_batch(1))
    assert not np.array_equal(first_batch(1), first_batch(2))


def test_skipping_batches_resumes_the_same_order(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())
    loader = Loader(ds, "train", settings(), 0, 1, Storage(), DataStats())
    full = [b.data.copy() for b in loader.epoch(4)]
    resumed = [b.data.copy() for b in loader.epoch(4, skip_batches=3)]
    loader.close()
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_too_few_images_for_one_batch_is_an_input_error(tiny_dataset):
    ds = load_dataset(tiny_dataset, Storage())
    with pytest.raises(InputError, match="less than one batch of 512"):
        Loader(ds, "train", settings(batch_size=512), 0, 1, Storage(), DataStats())


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(InputError, match=r"manifest.json: no dataset manifest"):
        load_dataset(str(tmp_path), Storage())


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)], ids=["2-1", "1-2", "2-3"])
def test_an_epoch_resumed_on_another_world_size_sees_each_remaining_record_once(
    tiny_dataset, before, after
):
    """``before`` ranks trained 2 batches each of epoch 1, then the job restarted on ``after``:
    the new ranks share out exactly what the old ones had left (less a remainder smaller than
    a global batch), and nothing the old ones trained."""
    storage, epoch, skip, b = Storage(), 1, 2, 8
    dataset = load_dataset(tiny_dataset, storage)
    settings = LoaderSettings(batch_size=b, image_size=32, workers=1, shuffle_buffer=16)

    def loader(rank, size):
        return Loader(dataset, "train", settings, rank, size, storage, DataStats())

    def keys(samples):
        return [(s.shard, s.offset) for s in samples]

    old = [loader(r, before) for r in range(before)]
    trained = [k for ld in old for k in keys(itertools.islice(ld._records(epoch), skip * b))]
    whole = [
        k for ld in old for k in keys(itertools.islice(ld._records(epoch), ld.steps_per_epoch * b))
    ]
    new = [loader(r, after) for r in range(after)]
    rest = [keys(ld._rest_of_epoch(epoch, skip, before)) for ld in new]
    merged = [k for part in rest for k in part]
    assert sorted(trained + merged) == sorted(whole)
    assert len(set(merged)) == len(merged)  # each once, on one rank
    steps = new[0].steps_left(skip, before)
    assert all(ld.steps_left(skip, before) == steps for ld in new)
    assert 0 <= len(merged) - steps * b * after < b * after  # at most a global batch dropped
    batches = list(new[0].epoch(epoch, skip_batches=skip, trained_by=before))
    assert len(batches) == steps
    for ld in old + new:
        ld.close()
