"""Megatron mmap indexed dataset: writer/reader round trip, an independent reader of the published format,
and clear errors for damaged files."""
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama.data import DataError, IndexedDataset, IndexedDatasetWriter


def read_idx_independently(path):
    """The .idx layout as published (Megatron-LM megatron/core/datasets/indexed_dataset.py), with struct only."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack_from("<QBQQ", raw, 9)
    off = 34
    sizes = struct.unpack_from(f"<{n}i", raw, off)
    pointers = struct.unpack_from(f"<{n}q", raw, off + 4 * n)
    doc_idx = struct.unpack_from(f"<{m}q", raw, off + 12 * n)
    assert len(raw) == off + 12 * n + 8 * m
    return version, code, list(sizes), list(pointers), list(doc_idx)


def write(prefix, docs, vocab_size):
    w = IndexedDatasetWriter(prefix, vocab_size=vocab_size)
    for d in docs:
        w.add_document(np.asarray(d, dtype=np.int64))
    w.finalize()


@settings(max_examples=15)
@given(docs=st.lists(st.lists(st.integers(0, 69999), max_size=40), min_size=0, max_size=12),
       big=st.booleans())
def test_round_trip_and_independent_reader(tmp_path_factory, docs, big):
    vocab = 70000 if big else 32000
    docs = [[t % vocab for t in d] for d in docs]
    prefix = str(tmp_path_factory.mktemp("idx") / "data")
    write(prefix, docs, vocab)
    version, code, sizes, pointers, doc_idx = read_idx_independently(prefix + ".idx")
    itemsize = 4 if big else 2
    assert version == 1 and code == (4 if big else 8)        # int32 / uint16 in Megatron's code table
    assert sizes == [len(d) for d in docs]
    assert pointers == [itemsize * sum(sizes[:i]) for i in range(len(docs))]
    assert doc_idx == list(range(len(docs) + 1))
    flat = np.fromfile(prefix + ".bin", dtype="<i4" if big else "<u2")
    assert flat.tolist() == [t for d in docs for t in d]
    ds = IndexedDataset(prefix + ".bin")                     # a path with extension names the same dataset
    assert len(ds) == len(docs)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.dtype == np.dtype(np.int32 if big else np.uint16)


def test_reads_a_file_written_from_the_format(tmp_path):
    # A Megatron-style file built byte by byte (int32 tokens, 2 documents), as another tool would write it.
    prefix = str(tmp_path / "ext")
    docs = [[5, 6, 7], [9]]
    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<4i", 5, 6, 7, 9))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3))
        f.write(struct.pack("<2i", 3, 1) + struct.pack("<2q", 0, 12) + struct.pack("<3q", 0, 1, 2))
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(2)] == docs
    ds.check_vocab(10)
    with pytest.raises(DataError, match=r"ext\.bin: token id 9 in sequence 1 is outside the vocabulary \[0, 8\)"):
        ds.check_vocab(8)


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    write(prefix, [[1, 2, 3], [4, 5], [6]], 100)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_wrong_magic(good):
    _patch(good + ".idx", 0, b"XXIDIDX")
    with pytest.raises(DataError, match=r"good\.idx: wrong magic"):
        IndexedDataset(good)


def test_wrong_version(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"good\.idx: format version 2"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    _patch(good + ".idx", 17, struct.pack("<B", 9))
    with pytest.raises(DataError, match=r"unknown dtype code 9"):
        IndexedDataset(good)


def test_truncated_bin(good):
    os.truncate(good + ".bin", os.path.getsize(good + ".bin") - 2)
    with pytest.raises(DataError, match=r"good\.bin: 10 bytes, but .*12 bytes \(truncated \.bin\)"):
        IndexedDataset(good)


def test_truncated_idx(good):
    os.truncate(good + ".idx", os.path.getsize(good + ".idx") - 8)
    with pytest.raises(DataError, match=r"good\.idx: .*truncated"):
        IndexedDataset(good)
    os.truncate(good + ".idx", 20)
    with pytest.raises(DataError, match=r"shorter than the 34-byte header"):
        IndexedDataset(good)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        IndexedDataset(str(tmp_path / "nope"))


def test_writer_rejects_ids_beyond_vocab_and_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "w")
    with pytest.raises(DataError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
        with IndexedDatasetWriter(prefix, vocab_size=100) as w:
            w.add_document([1, 2])
            w.add_document([100])
    assert os.listdir(tmp_path) == []


def test_unfinished_writer_leaves_no_valid_looking_file(tmp_path):
    prefix = str(tmp_path / "w")
    w = IndexedDatasetWriter(prefix, vocab_size=100)
    w.add_document([1, 2, 3])
    # Not finalised (an interrupted run): only a temporary name exists, nothing that the reader takes.
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert all(".tmp-" in n for n in os.listdir(tmp_path))
    w.abort()
    assert os.listdir(tmp_path) == []
