"""Stage 1, the input: an image folder → RecordIO shards on S3 (``prepare``, ``records``) →
each rank's share of them as decoded, augmented batches (``data``, ``augment``)."""
