"""The streaming reader's read-ahead and the batch memory it recycles, on moto's S3 server."""

import gc
import time

import mxnet as mx
import numpy as np

from job.input.data import BufferPool, DataStats, Piece, ShardReader, load_dataset, to_ndarray
from job.storage import S3Settings, Storage


class CountingStorage(Storage):
    """Real S3 reads, with every GET of a shard remembered."""

    def __init__(self, settings):
        super().__init__(settings)
        self.opened = []

    def open_read(self, uri, start=0, end=None):
        if uri.endswith(".rec"):
            self.opened.append(uri)
        return super().open_read(uri, start, end)


def test_the_next_shard_is_requested_while_this_one_is_read(
    tiny_dataset, s3_upload, s3_server, s3_bucket
):
    root = f"{s3_bucket}/ds"
    s3_upload(tiny_dataset, root)
    storage = CountingStorage(S3Settings(endpoint_url=s3_server))
    shards = load_dataset(root, storage).splits["train"]
    pieces = [Piece(s, 0, s.count) for s in shards]
    stream = ShardReader(storage, DataStats()).stream(pieces)
    next(stream)  # the first record of shard 0
    deadline = time.monotonic() + 5
    while len(storage.opened) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert storage.opened == [shards[0].uri, shards[1].uri]  # one GET each, shard 1 ahead
    rest = list(stream)
    assert len(rest) + 1 == sum(s.count for s in shards)
    assert storage.opened == [s.uri for s in shards]  # no shard fetched twice


def test_batch_arrays_are_recycled_only_when_nothing_holds_them():
    pool = BufferPool(keep=4)
    first = pool.get((2, 3, 8, 8))
    address = first.ctypes.data
    view = first[:1]
    del first
    assert pool.get((2, 3, 8, 8)).ctypes.data != address  # a view still refers to it
    del view
    gc.collect()
    assert pool.get((2, 3, 8, 8)).ctypes.data == address


def test_to_ndarray_shares_cpu_memory_and_the_pool_reuses_it_after():
    pool = BufferPool(keep=2)
    batch = pool.get((4, 3, 8, 8))
    batch[:] = np.arange(batch.size, dtype=np.float32).reshape(batch.shape)
    address = batch.ctypes.data
    nd = to_ndarray(batch, mx.cpu())
    np.testing.assert_array_equal(nd.asnumpy(), batch)
    del batch
    assert pool.get((4, 3, 8, 8)).ctypes.data != address  # the NDArray still uses it
    del nd
    gc.collect()
    again = pool.get((4, 3, 8, 8))
    assert again.ctypes.data == address and again.flags.writeable
