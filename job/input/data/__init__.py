"""The input pipeline: a rank's share of the shards → records → decoded, augmented batches.

Each rank streams its pieces of the shards (one GET per piece, from S3 or a local file)
in a background thread, shuffles records in a buffer, and decodes and augments them in a
thread pool straight into a preallocated float32 batch; finished batches wait in a short
queue so the training step never waits for the next one while there is work ahead.

Every rank runs the same number of steps per epoch (Horovod's allreduce needs it): the
count comes from the manifest, and a rank whose share runs short (skipped corrupt records)
starts its share again to fill the last batches.

The package, by responsibility: ``manifest`` (the dataset model and shard assignment),
``stats`` (corruption accounting), ``reader`` (a ranged S3/local reader with retries),
``streams`` (threads and shuffling), ``loader`` (decode, augment, batch; the buffer pool)
and ``synthetic`` (the in-memory dataset).
"""

from job.input.data.loader import Batch, BufferPool, Loader, LoaderSettings, to_ndarray
from job.input.data.manifest import (
    Dataset,
    Piece,
    Shard,
    assign_shards,
    load_dataset,
    parse_manifest,
)
from job.input.data.reader import Sample, ShardReader, _Attempts
from job.input.data.stats import DataStats
from job.input.data.streams import background, shuffled
from job.input.data.synthetic import SyntheticLoader

__all__ = [
    "Batch",
    "BufferPool",
    "DataStats",
    "Dataset",
    "Loader",
    "LoaderSettings",
    "Piece",
    "Sample",
    "Shard",
    "ShardReader",
    "SyntheticLoader",
    "_Attempts",
    "assign_shards",
    "background",
    "load_dataset",
    "parse_manifest",
    "shuffled",
    "to_ndarray",
]
