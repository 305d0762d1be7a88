"""JSONL -> Megatron ``PREFIX.bin``/``PREFIX.idx`` (``python -m llama.data``), with worker processes.

Input lines are read as bytes in chunks; each chunk is decoded (strict UTF-8), parsed and tokenized by a worker
(sentencepiece's batch encode, one thread per worker) and the results are written in input order, so the output
is byte-identical whatever ``--workers``. One end-of-document token (Llama's eos, id 2) follows every document
(Megatron's ``--append-eod``); no BOS is added. Blank lines are skipped. Empty texts are skipped and counted.

Modes: ``text`` (the ``--json-key`` field), ``sft`` (``input``/``output`` with ``--prompt-template``; also writes
``PREFIX.lossmask.bin/.idx``, uint8, 1 on answer tokens) and ``qnli`` (``question``/``sentence``/``label``
formatted by ``llama.data.sft.format_qnli``, then as ``sft``). A ``PREFIX.meta.json`` records the tokenizer
(path, vocab size, sha256), the counts and the inputs. Everything is written under temporary names and renamed
when complete.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys

import numpy as np

from llama.data.errors import DataError
from llama.data.indexed import IndexedDatasetWriter, split_prefix
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, format_qnli, prompt_and_answer, split_template
from llama.data.tokenizer import Tokenizer, sha256_file, train_tokenizer, write_json_atomic

CHUNK_LINES = 512
CHUNK_BYTES = 1 << 20
MODES = ("text", "sft", "qnli")


# ---------------------------------------------------------------------------------------------- reading
def _decode_line(raw: bytes, path: str, lineno: int):
    """The JSON object on one line, or None for a blank line; DataError naming file:line otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not line.strip():
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


def iter_chunks(path: str, chunk_lines: int = CHUNK_LINES, chunk_bytes: int = CHUNK_BYTES):
    """(path, first line number, [raw lines], bytes) chunks of a file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such input file")
    with open(path, "rb") as f:
        start, lines, size = 1, [], 0
        for lineno, raw in enumerate(f, 1):
            lines.append(raw)
            size += len(raw)
            if len(lines) >= chunk_lines or size >= chunk_bytes:
                yield path, start, lines, size
                start, lines, size = lineno + 1, [], 0
        if lines:
            yield path, start, lines, size


def iter_jsonl_texts(path: str, json_key: str = "text"):
    """The ``json_key`` texts of a JSONL file, checked as the preparation checks them."""
    for path, start, lines, _ in iter_chunks(path):
        for i, raw in enumerate(lines):
            obj = _decode_line(raw, path, start + i)
            if obj is not None:
                yield _text_field(obj, json_key, f"{path}:{start + i}")


def iter_text_file(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None


def iter_training_texts(paths, mode: str, json_key: str, prompt_template: str):
    """Texts to train a tokenizer on: the documents as they will be tokenized."""
    parts = split_template(prompt_template) if mode != "text" else None
    for path in paths:
        for p, start, lines, _ in iter_chunks(path):
            for i, raw in enumerate(lines):
                where = f"{p}:{start + i}"
                obj = _decode_line(raw, p, start + i)
                if obj is None:
                    continue
                if mode == "text":
                    yield _text_field(obj, json_key, where)
                else:
                    if mode == "qnli":
                        obj = format_qnli(obj, where)
                    prompt, answer = prompt_and_answer(obj, parts, where)
                    yield prompt + answer


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, mode: str, json_key: str, prompt_template: str, append_eod: bool):
    tok = Tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, mode=mode, json_key=json_key, append_eod=append_eod,
                   parts=split_template(prompt_template) if mode != "text" else None)


def _flatten(lists, dtype=np.int64) -> np.ndarray:
    total = sum(map(len, lists))
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=total)


def _process_chunk(chunk):
    """One chunk -> (flat tokens, lengths, flat mask or None, empty-document count, bytes)."""
    path, start, lines, size = chunk
    w = _WORKER
    tok, eod = w["tok"], (w["tok"].eod_id if w["append_eod"] else None)
    tail = [eod] if eod is not None else []
    objs = []
    for i, raw in enumerate(lines):
        obj = _decode_line(raw, path, start + i)
        if obj is not None:
            objs.append((obj, f"{path}:{start + i}"))
    if w["mode"] == "text":
        texts = [_text_field(o, w["json_key"], where) for o, where in objs]
        texts = [t for t in texts if t]
        empty = len(objs) - len(texts)
        ids = tok.encode_batch(texts)
        if tail:
            for x in ids:
                x.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return _flatten(ids), lengths, None, empty, size
    prompts, answers = [], []
    for o, where in objs:
        if w["mode"] == "qnli":
            o = format_qnli(o, where)
        p, a = prompt_and_answer(o, w["parts"], where)
        prompts.append(p)
        answers.append(a)
    p_ids, a_ids = tok.encode_batch(prompts), tok.encode_batch(answers)
    docs = [p + a + tail for p, a in zip(p_ids, a_ids)]
    masks = [[0] * len(p) + [1] * (len(a) + len(tail)) for p, a in zip(p_ids, a_ids)]
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    return _flatten(docs), lengths, _flatten(masks, np.uint8), 0, size


def _ordered_results(chunks, workers: int, initargs):
    """Results of _process_chunk in input order, at most 2 * workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*initargs)
        for c in chunks:
            yield _process_chunk(c)
        return
    # fork: the worker needs only this module and sentencepiece; spawn would re-import torch per worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_process_chunk, (c,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------- driver
def prepare(inputs, output_prefix: str, tokenizer: str, mode: str = "text", json_key: str = "text",
            prompt_template: str = DEFAULT_PROMPT_TEMPLATE, workers: int = 1, append_eod: bool = True,
            progress: bool = False) -> dict:
    """Tokenize JSONL ``inputs`` into ``output_prefix.{bin,idx}`` (+ ``.lossmask`` for sft/qnli); returns the
    metadata also written to ``output_prefix.meta.json``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if mode not in MODES:
        raise DataError(f"unknown mode {mode!r}; known: {MODES}")
    if mode != "text":
        split_template(prompt_template)      # a bad template fails before any work
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"{p}: no such input file")
    prefix = split_prefix(os.fspath(output_prefix))
    tok = Tokenizer(tokenizer)
    writer = IndexedDatasetWriter(prefix, vocab_size=tok.vocab_size)
    mask_writer = IndexedDatasetWriter(prefix + ".lossmask", dtype=np.uint8) if mode != "text" else None
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=os.path.basename(prefix), file=sys.stderr)
    docs = tokens = empty = 0
    initargs = (tok.path, mode, json_key, prompt_template, append_eod)
    chunks = itertools.chain.from_iterable(iter_chunks(p) for p in inputs)
    try:
        for flat, lengths, mask, n_empty, size in _ordered_results(chunks, workers, initargs):
            writer.add_documents(flat, lengths)
            if mask_writer is not None:
                mask_writer.add_documents(mask, lengths)
            docs += len(lengths)
            tokens += int(flat.size)
            empty += n_empty
            if bar is not None:
                bar.update(size)
        if docs == 0:
            raise DataError(f"{', '.join(inputs)}: empty corpus (no non-empty document"
                            f"{'' if mode != 'text' else f' in field {json_key!r}'})")
        meta = {"format": "megatron-mmap", "prefix": os.path.abspath(prefix), "mode": mode,
                "json_key": json_key if mode == "text" else None,
                "prompt_template": prompt_template if mode != "text" else None,
                "inputs": [os.path.abspath(p) for p in inputs], "documents": docs, "tokens": tokens,
                "empty_documents_skipped": empty, "append_eod": append_eod, "eod_id": tok.eod_id,
                "dtype": str(writer.dtype), "loss_mask": prefix + ".lossmask" if mask_writer else None,
                **tok.meta()}
        if mask_writer is not None:
            mask_writer.finalize()
        writer.finalize()
        write_json_atomic(prefix + ".meta.json", meta)
        return meta
    except BaseException:
        writer.abort()
        if mask_writer is not None:
            mask_writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def obtain_tokenizer(prefix: str, inputs, vocab_size: int, mode: str, json_key: str, prompt_template: str) -> str:
    """``PREFIX.tokenizer.model`` trained on the inputs, reused when its sidecar shows the same vocab and inputs."""
    model_prefix = split_prefix(prefix) + ".tokenizer"
    signature = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in inputs]
    sidecar = model_prefix + ".json"
    if os.path.isfile(model_prefix + ".model") and os.path.isfile(sidecar):
        with open(sidecar) as f:
            meta = json.load(f)
        if (meta.get("vocab_size") == vocab_size and meta.get("trained_on") == signature
                and meta.get("tokenizer_sha256") == sha256_file(model_prefix + ".model")):
            return model_prefix + ".model"
    path = train_tokenizer(iter_training_texts(inputs, mode, json_key, prompt_template), vocab_size, model_prefix)
    meta = Tokenizer(path).meta()
    meta.update(trained_on=signature, mode=mode)
    write_json_atomic(sidecar, meta)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llama.data", description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one document per line")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model (or a folder holding one)")
    src.add_argument("--train-tokenizer", action="store_true",
                     help="train a Llama-2-style BPE tokenizer on the inputs into PREFIX.tokenizer.model (cached)")
    ap.add_argument("--vocab-size", type=int, help="with --train-tokenizer")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--sft", action="store_true", help="records with 'input'/'output'; loss on the answer only")
    ap.add_argument("--format", choices=("qnli",), help="qnli: question/sentence/label records (implies --sft)")
    ap.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        ap.error("--train-tokenizer needs --vocab-size N")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    mode = "qnli" if args.format == "qnli" else ("sft" if args.sft else "text")
    try:
        if args.train_tokenizer:
            tok = obtain_tokenizer(args.output_prefix, args.input, args.vocab_size, mode, args.json_key,
                                   args.prompt_template)
        else:
            tok = args.tokenizer
        meta = prepare(args.input, args.output_prefix, tok, mode=mode, json_key=args.json_key,
                       prompt_template=args.prompt_template, workers=args.workers, append_eod=args.append_eod,
                       progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['prefix']}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']})")
    return 0
