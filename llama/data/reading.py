"""Reading the inputs of the data pipeline: JSONL files in chunks of whole lines, strict UTF-8, checked objects.

Shared by the preparation (``llama.data.prepare``, whose workers read their own chunks) and tokenizer training
(``llama.data.tokenizer``); it imports neither, so the two never import each other. Errors name file:line.
"""
from __future__ import annotations

import json
import os

from llama.data.errors import DataError

# Bytes of input per chunk (a chunk is whole lines: at least one line, so a longer line makes a longer chunk).
# Small enough that a few MB keep two workers busy and that 2 * workers chunks in flight stay small; the cost per
# chunk (a descriptor out, a few arrays back) is a fraction of a millisecond against ~0.25 s of tokenizing per MiB.
CHUNK_BYTES = 1 << 20


def _parse_line(line: str, path: str, lineno: int):
    """The JSON object on one line, or None for a blank line; DataError naming file:line otherwise."""
    # isspace() is strip()'s whitespace test without building a stripped copy of a long line.
    if not line or line.isspace():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _text_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def iter_spans(path: str, chunk_bytes: int = CHUNK_BYTES):
    """Chunks of whole lines of a file as ``(path, byte offset, byte length, first line number)``.

    The file is read in ``chunk_bytes`` blocks, cut after the last newline of each block, and its newlines counted
    (``bytes.count``): about a millisecond per MB, the only work the main process does on the input. Workers read
    their own byte range (``read_span``)."""
    if chunk_bytes < 1:
        raise ValueError(f"iter_spans: chunk_bytes must be >= 1, got {chunk_bytes}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such input file")
    block = bytearray(chunk_bytes)              # reused: no fresh buffer (and its page faults) per block
    with open(path, "rb", buffering=0) as f:
        start, lineno, pending = 0, 1, 0        # pending: bytes read after `start`, none of them a newline
        while True:
            n = f.readinto(block)
            if not n:
                break
            cut = block.rfind(b"\n", 0, n) + 1
            if cut == 0:                        # inside a line longer than a block: the chunk grows
                pending += n
                continue
            yield path, start, pending + cut, lineno
            start += pending + cut
            lineno += block.count(b"\n", 0, cut)
            pending = n - cut
        if pending:                             # a last line without a newline
            yield path, start, pending, lineno


def read_span(span) -> list[str]:
    """The lines (without their newline) of one ``iter_spans`` chunk; DataError naming file:line for bytes that are
    not UTF-8. The chunk is decoded at once (one call instead of one per line); a newline byte is never part of
    another UTF-8 character, so splitting the text at "\\n" gives the lines the bytes have."""
    path, offset, length, lineno = span
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise DataError(f"{path}: changed while being read ({len(data)} bytes at offset {offset}, expected {length})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Lines start after a newline, a character boundary: the first bad byte of the chunk is the first bad byte
        # of its line, at the same place as when that line is decoded alone.
        begin, bad = data.rfind(b"\n", 0, e.start) + 1, lineno + data.count(b"\n", 0, e.start)
        where = f"{path}:{bad}: not valid UTF-8"
        raise DataError(f"{where} (byte {e.start - begin}: {data[e.start:e.start + 1]!r})") from None
    lines = text.split("\n")
    if lines[-1] == "":                         # after the last newline: not a line
        lines.pop()
    return lines


_DECODER = json.JSONDecoder()      # json.loads' own settings


def chunk_objects(span):
    """``(JSON object, line number)`` of the non-blank lines of one chunk, checked (file:line errors)."""
    path, _, _, lineno = span
    decode, out = _DECODER.raw_decode, []
    for i, line in enumerate(read_span(span), lineno):
        # raw_decode skips json.loads' wrapper (whitespace matching; 0.56x its time on 20k QNLI lines); a line it
        # does not take whole as one object (blank, surrounding whitespace, an error) goes through json.loads.
        try:
            obj, end = decode(line)
        except ValueError:
            obj, end = None, -1
        if end != len(line) or type(obj) is not dict:
            obj = _parse_line(line, path, i)
            if obj is None:
                continue
        out.append((obj, i))
    return out


def iter_jsonl_texts(path: str, json_key: str = "text"):
    """The ``json_key`` texts of a JSONL file, checked as the preparation checks them."""
    for span in iter_spans(path):
        for obj, i in chunk_objects(span):
            yield _text_field(obj, json_key, f"{path}:{i}")


def iter_text_file(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
