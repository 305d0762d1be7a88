"""Checksums of prepared datasets: recorded by ``python -m llama.data``, verified when training opens the data.

``PREFIX.meta.json`` gets a ``checksums`` table: for each of ``.bin``/``.idx`` (and ``.lossmask.bin``/``.idx``) its
size, its sha256 and the blake2b-128 digest of every 16 MiB block. ``verify_dataset`` checks, by mode:
    fast (default)  every file's size; the full sha256 of each ``.idx`` (12 bytes per document); every block of a
                    ``.bin`` up to 256 MiB (so small datasets are checked in full, at ~1 GB/s); above that the first,
                    the last and 16 evenly spaced blocks. Guarantee: any change of size, any change to an index, and
                    any change to a ``.bin`` of at most 256 MiB is detected; in a larger ``.bin`` a change confined to
                    unsampled blocks is found only by ``full``.
    full            every block of every file (``train.py --verify-data full``).
    off             nothing.
Datasets prepared before checksums existed have none recorded and are read unchecked. The tokenizer a dataset was
made with is recorded too (``tokenizer_sha256``): ``check_tokenizer`` refuses another one.
"""
from __future__ import annotations

import hashlib
import json
import os

from llama.data.errors import DataError
from llama.data.tokenizer import Tokenizer, sha256_file

BLOCK_BYTES = 16 << 20
FULL_CHECK_BYTES = 256 << 20
SAMPLED_BLOCKS = 16
SUFFIXES = (".bin", ".idx", ".lossmask.bin", ".lossmask.idx")
MODES = ("fast", "full", "off")


def _block_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_record(path: str) -> dict:
    """{bytes, sha256, blocks: [blake2b-128 per BLOCK_BYTES]} of one file, in one pass."""
    full, blocks = hashlib.sha256(), []
    with open(path, "rb") as fh:
        for data in iter(lambda: fh.read(BLOCK_BYTES), b""):
            full.update(data)
            blocks.append(_block_digest(data))
    return {"bytes": os.path.getsize(path), "sha256": full.hexdigest(), "blocks": blocks}


def dataset_checksums(prefix: str) -> dict:
    """{suffix: file_record} for the dataset files of ``prefix`` that exist."""
    return {sfx: file_record(prefix + sfx) for sfx in SUFFIXES if os.path.isfile(prefix + sfx)}


def _read_meta(prefix: str) -> tuple[dict | None, str]:
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return None, path
    try:
        with open(path) as fh:
            return json.load(fh), path
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e})") from None


def _blocks_to_check(n_blocks: int, size: int, mode: str) -> list[int]:
    if mode == "full" or size <= FULL_CHECK_BYTES:
        return list(range(n_blocks))
    picks = {0, n_blocks - 1} | {round(i * (n_blocks - 1) / (SAMPLED_BLOCKS + 1)) for i in range(1, SAMPLED_BLOCKS + 1)}
    return sorted(picks)


def verify_dataset(prefix: str, mode: str = "fast") -> bool:
    """Check the files of ``prefix`` against the checksums in its meta.json (see the module docstring); DataError
    naming the file and block on a mismatch. False when nothing is recorded (or mode "off")."""
    if mode not in MODES:
        raise ValueError(f"verify_dataset: mode must be one of {MODES}, got {mode!r}")
    meta, meta_path = _read_meta(prefix)
    sums = (meta or {}).get("checksums")
    if mode == "off" or not sums:
        return False
    for sfx, rec in sums.items():
        path = prefix + sfx
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing, but {meta_path} records it")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise DataError(f"{path}: {size} bytes, {meta_path} records {rec['bytes']} (modified or truncated after "
                            f"python -m llama.data wrote it; prepare it again)")
        if sfx.endswith(".idx") or mode == "full":
            blocks = range(len(rec["blocks"]))
        else:
            blocks = _blocks_to_check(len(rec["blocks"]), size, mode)
        with open(path, "rb") as fh:
            for i in blocks:
                fh.seek(i * BLOCK_BYTES)
                if _block_digest(fh.read(BLOCK_BYTES)) != rec["blocks"][i]:
                    raise DataError(f"{path}: bytes {i * BLOCK_BYTES}..{min(size, (i + 1) * BLOCK_BYTES)} differ "
                                    f"from the checksum in {meta_path} (modified after python -m llama.data wrote "
                                    f"it; prepare it again)")
    return True


def check_tokenizer(prefix: str, tokenizer_path: str) -> None:
    """DataError if ``tokenizer_path`` is not the tokenizer ``prefix`` was made with (sha256 in its meta.json)."""
    meta, meta_path = _read_meta(prefix)
    want = (meta or {}).get("tokenizer_sha256")
    if not want:
        return
    path = Tokenizer(tokenizer_path).path
    got = sha256_file(path)
    if got != want:
        raise DataError(f"tokenizer {path} (sha256 {got[:12]}...) is not the one {prefix} was made with "
                        f"({meta.get('tokenizer')}, sha256 {want[:12]}... in {meta_path})")
