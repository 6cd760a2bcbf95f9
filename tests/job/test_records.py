import io
import struct

import pytest
from mxnet import recordio

from job.input.records import MAGIC_BYTES, RecordStream, frame, index_line, pack, read_index


def write_rec(path, payloads):
    writer = recordio.MXIndexedRecordIO(str(path) + ".idx", str(path), "w")
    for i, p in enumerate(payloads):
        writer.write_idx(i, p)
    writer.close()
    return path.read_bytes(), read_index((path.parent / (path.name + ".idx")).read_text())


PAYLOADS = [bytes([i]) * (i * 7 + 1) for i in range(20)]


def read_all(data, **kw):
    corrupt = []
    records = list(RecordStream("shard", io.BytesIO(data), on_corrupt=corrupt.append, **kw))
    return records, corrupt


def test_stream_reads_what_mx_recordio_wrote(tmp_path):
    data, offsets = write_rec(tmp_path / "a.rec", PAYLOADS)
    records, corrupt = read_all(data)
    assert [r.payload for r in records] == PAYLOADS
    assert [r.offset for r in records] == offsets
    assert corrupt == []


def test_payload_containing_the_magic_is_split_and_rejoined(tmp_path):
    tricky = [b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij", MAGIC_BYTES * 3, b"x"]
    data, _ = write_rec(tmp_path / "m.rec", tricky)
    assert data.count(MAGIC_BYTES) > 3  # really written as multi-part records
    records, corrupt = read_all(data)
    assert [r.payload for r in records] == tricky and corrupt == []


def test_a_byte_range_reads_exactly_its_records(tmp_path):
    data, offsets = write_rec(tmp_path / "r.rec", PAYLOADS)
    start, end = offsets[5], offsets[9]
    stream = io.BytesIO(data)
    stream.seek(start)
    limited = io.BytesIO(data[start:end])
    records = list(RecordStream("s", limited, start=start, end=end))
    assert [r.payload for r in records] == PAYLOADS[5:9]
    assert records[0].offset == start


def test_bad_magic_is_skipped_counted_and_resynchronised(tmp_path):
    data, offsets = write_rec(tmp_path / "c.rec", PAYLOADS)
    broken = bytearray(data)
    broken[offsets[3] : offsets[3] + 4] = b"\0\0\0\0"  # record 3 loses its magic
    records, corrupt = read_all(bytes(broken))
    assert [r.payload for r in records] == PAYLOADS[:3] + PAYLOADS[4:]
    assert len(corrupt) == 1 and corrupt[0].offset == offsets[3] and "magic" in corrupt[0].reason


def test_impossible_length_is_skipped(tmp_path):
    data, offsets = write_rec(tmp_path / "l.rec", PAYLOADS)
    broken = bytearray(data)
    broken[offsets[7] + 4 : offsets[7] + 8] = struct.pack("<I", (1 << 29) - 1)
    records, corrupt = read_all(bytes(broken))
    assert [r.payload for r in records] == PAYLOADS[:7] + PAYLOADS[8:]
    assert len(corrupt) == 1 and "length" in corrupt[0].reason


def test_truncated_shard_keeps_every_whole_record(tmp_path):
    data, offsets = write_rec(tmp_path / "t.rec", PAYLOADS)
    records, corrupt = read_all(data[: offsets[12] + 10])
    assert [r.payload for r in records] == PAYLOADS[:12]
    assert len(corrupt) == 1 and "truncated" in corrupt[0].reason


def test_garbage_between_records_is_skipped(tmp_path):
    data, offsets = write_rec(tmp_path / "g.rec", PAYLOADS)
    broken = data[: offsets[10]] + b"\x01\x02\x03\x04" * 9 + data[offsets[10] :]
    records, corrupt = read_all(broken)
    assert [r.payload for r in records] == PAYLOADS
    assert len(corrupt) == 1


class Flaky(io.BytesIO):
    """A stream that fails once after ``fail_at`` bytes, like a dropped connection."""

    def __init__(self, data, fail_at):
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n=-1):
        if self.fail_at is None:
            return super().read(n)
        if self.tell() >= self.fail_at:
            self.fail_at = None
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(n if n > 0 else 1 << 30, self.fail_at - self.tell()))


@pytest.mark.parametrize("fail_at", [1, 57, 300, 601])
def test_dropped_stream_resumes_without_loss_or_duplicates(tmp_path, fail_at):
    data, _ = write_rec(tmp_path / "f.rec", PAYLOADS)
    reopened = []

    def reopen(offset, error):
        reopened.append(offset)
        return io.BytesIO(data[offset:])

    stream = RecordStream("f", Flaky(data, fail_at), reopen=reopen)
    assert [r.payload for r in stream] == PAYLOADS
    assert len(reopened) == 1 and reopened[0] <= fail_at


def test_without_reopen_a_read_error_propagates(tmp_path):
    data, _ = write_rec(tmp_path / "e.rec", PAYLOADS)
    with pytest.raises(ConnectionResetError):
        list(RecordStream("e", Flaky(data, 100)))


# The magic at every alignment, at both ends, back to back, and a record of nothing.
WRITE_CASES = [
    b"",
    b"abc",
    MAGIC_BYTES,
    MAGIC_BYTES * 3,
    b"ab" + MAGIC_BYTES + b"cd",  # unaligned: not a split point
    b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij",
    b"x" + MAGIC_BYTES + b"yyy" + MAGIC_BYTES,
    b"abcd" + MAGIC_BYTES,
    *PAYLOADS,
]


def test_frame_and_pack_write_what_mx_recordio_writes(tmp_path):
    """Byte for byte against MXNet's own writer, .rec and .idx."""
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "mx.idx"), str(tmp_path / "mx.rec"), "w")
    ours, index, offset = b"", "", 0
    for i, payload in enumerate(WRITE_CASES):
        writer.write_idx(i, recordio.pack(recordio.IRHeader(0, float(i % 7), i, 0), payload))
        framed = frame(pack(i % 7, i, payload))
        index += index_line(i, offset)
        ours, offset = ours + framed, offset + len(framed)
    writer.close()
    assert ours == (tmp_path / "mx.rec").read_bytes()
    assert index == (tmp_path / "mx.idx").read_text()
    records, corrupt = read_all(ours)
    assert [recordio.unpack(r.payload)[1] for r in records] == WRITE_CASES and corrupt == []
