"""Megatron-LM's mmap indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``): reader and writer.

Format, as written by Megatron-LM ``megatron/core/datasets/indexed_dataset.py`` (``_IndexWriter``, ``DType``):

    .idx  b"MMIDIDX\\x00\\x00"  9 bytes magic
          <Q   version = 1
          <B   dtype code of the tokens in .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
               7 float32, 8 uint16 (Megatron-LM's current ``DType`` enum; uint16 when the vocabulary is < 65500)
          <Q   sequence count n
          <Q   document-index count m (= documents + 1)
          int32 sizes[n]      tokens per sequence
          int64 pointers[n]   byte offset of each sequence in .bin
          int64 doc_idx[m]    sequence index where each document starts, doc_idx[0] = 0, doc_idx[-1] = n
          (multimodal files append int8 modes[n]; read and ignored here)
    .bin  the sequences' tokens, concatenated, in the dtype above.

Existing files (Megatron, NeMo) are read as they are. Every sequence is one training document here (what
``preprocess_data.py`` writes without ``--split-sentences``).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from llama.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 entries, int32 otherwise."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def owner_gone(name: str) -> bool:
    """Whether the process whose pid ends a temporary name (``*.tmp-<pid>``) no longer runs on this host, so that
    its leftover (a killed run's) is safe to delete; a live process's is never touched."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:            # alive, another user's
        return False
    return False


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete ``PREFIX.*.tmp-<pid>`` files of killed runs (pid gone); returns what was removed."""
    folder, base = os.path.split(os.path.abspath(prefix))
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(base + ".") and ".tmp-" in name and owner_gone(name):
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def split_prefix(path: str) -> str:
    """``data/x``, ``data/x.bin`` and ``data/x.idx`` all name the dataset ``data/x``."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; ``ds[i]`` is sequence i as a numpy array (a memmap view)."""

    def __init__(self, prefix: str):
        self.prefix = split_prefix(os.fspath(prefix))
        self.idx_path, self.bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: no such file (an indexed dataset needs both PREFIX.bin and PREFIX.idx)")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise DataError(f"{self.idx_path}: {idx_size} bytes, shorter than the {HEADER_BYTES}-byte header "
                            f"of a Megatron .idx (truncated?)")
        if head[:9] != MAGIC:
            raise DataError(f"{self.idx_path}: wrong magic {head[:9]!r}, expected {MAGIC!r} (not a Megatron mmap "
                            f"indexed dataset; the legacy 'lazy'/'cached' formats are not read)")
        version, code, n, m = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise DataError(f"{self.idx_path}: format version {version}, only version {VERSION} is known")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}; known codes {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * m
        if idx_size not in (expected, expected + n):      # + n: multimodal files carry int8 modes
            raise DataError(f"{self.idx_path}: {idx_size} bytes, but a header with {n} sequences and {m} "
                            f"document indices needs {expected} (truncated or corrupt)")
        idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=m, offset=HEADER_BYTES + 12 * n)
        if n and (self.sizes.min() < 0):
            raise DataError(f"{self.idx_path}: negative sequence size at sequence {int(np.argmin(self.sizes))}")
        item = self.dtype.itemsize
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * item if n else 0
        bin_size = os.path.getsize(self.bin_path)
        if bin_size < need:
            raise DataError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} points to {need} bytes "
                            f"(truncated .bin)")
        if bin_size % item:
            raise DataError(f"{self.bin_path}: {bin_size} bytes is not a multiple of the {self.dtype} item size "
                            f"{item} (truncated .bin)")
        if n:
            ends = np.cumsum(self.sizes.astype(np.int64)) * item
            if not np.array_equal(self.pointers[1:], ends[:-1]) or self.pointers[0] != 0:
                raise DataError(f"{self.idx_path}: sequence pointers are not the running sum of the sizes "
                                f"(corrupt index)")
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)
        self._offsets = (self.pointers // item) if n else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range ({n} sequences)")
        i %= n
        start = int(self._offsets[i])
        return self._bin[start: start + int(self.sizes[i])]

    def get_range(self, i: int, start: int, length: int) -> np.ndarray:
        """Tokens ``start:start+length`` of sequence i (no copy)."""
        off = int(self._offsets[i]) + start
        return self._bin[off: off + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def max_token(self) -> int:
        """Largest value in .bin (one pass over the file)."""
        return int(self._bin.max()) if self._bin.size else -1

    def check_vocab(self, vocab_size: int) -> None:
        """DataError if any token id is outside [0, vocab_size) (e.g. data made with another tokenizer)."""
        if not self._bin.size:
            return
        lo, hi = int(self._bin.min()), int(self._bin.max())
        if lo < 0 or hi >= vocab_size:
            bad = int(np.argmax((self._bin >= vocab_size) | (self._bin < 0)))
            seq = int(np.searchsorted(self._offsets, bad, side="right") - 1)
            raise DataError(f"{self.bin_path}: token id {int(self._bin[bad])} in sequence {seq} is outside the "
                            f"vocabulary [0, {vocab_size}) (made with another tokenizer?)")


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin``/``PREFIX.idx`` under temporary names; ``finalize()`` renames them into place.

    An interrupted run leaves only ``PREFIX.*.tmp-PID`` files, never a pair that looks valid. Token ids are
    checked against ``vocab_size`` as they are added. ``dtype`` overrides Megatron's choice (e.g. uint8 masks).
    """

    def __init__(self, prefix: str, vocab_size: int | None = None, dtype=None):
        self.prefix = split_prefix(os.fspath(prefix))
        if dtype is None:
            if vocab_size is None:
                raise ValueError("IndexedDatasetWriter needs vocab_size or dtype")
            dtype = token_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"IndexedDatasetWriter: dtype {self.dtype} has no Megatron code")
        self.vocab_size = vocab_size
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        self._tmp_bin = f"{self.prefix}.bin.tmp-{os.getpid()}"
        self._tmp_idx = f"{self.prefix}.idx.tmp-{os.getpid()}"
        self._f = open(self._tmp_bin, "wb")
        self._sizes: list[np.ndarray] = []
        self._done = False

    def add_document(self, tokens) -> None:
        flat = np.asarray(tokens).reshape(-1)
        self.add_documents(flat, [flat.size])

    def add_documents(self, flat_tokens: np.ndarray, lengths) -> None:
        """Several documents at once: their tokens concatenated, and their lengths."""
        flat = np.asarray(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"add_documents: lengths sum to {int(lengths.sum())}, tokens are {flat.size}")
        if flat.size and self.vocab_size is not None:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"{self.prefix}: token id {hi if hi >= self.vocab_size else lo} is outside the "
                                f"vocabulary [0, {self.vocab_size})")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a document of {int(lengths.max())} tokens exceeds int32 sizes")
        self._f.write(flat.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(lengths.astype(np.int32))

    def finalize(self) -> str:
        """Write the index, then rename .bin and .idx into place (the .idx last). Returns the prefix."""
        self._f.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        n = len(sizes)
        pointers = np.zeros(n, np.int64)
        if n > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(n + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
        # A stale .idx next to the new .bin would pair wrongly for a moment: remove it first.
        if os.path.exists(self.prefix + ".idx"):
            os.unlink(self.prefix + ".idx")
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")
        self._done = True
        return self.prefix

    def abort(self) -> None:
        """Remove the temporary files (after an error)."""
        if not self._f.closed:
            self._f.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.unlink(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()
        return None
