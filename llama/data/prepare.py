"""JSONL -> Megatron ``PREFIX.bin``/``PREFIX.idx`` (``python -m llama.data``), with worker processes.

The main process cuts each input into chunks of whole lines (byte offset, length and first line number, found by
reading blocks and counting newlines) and hands these descriptors to the workers; a worker reads its byte range,
decodes it (strict UTF-8), parses the JSON lines, tokenizes them (one sentencepiece thread per worker) and returns
the chunk's tokens as arrays already in the output dtype (reading: ``llama.data.reading``). Results are written in input order, so the output is
byte-identical whatever ``--workers``; errors name the file and line. One end-of-document token (Llama's eos,
id 2) follows every document (Megatron's ``--append-eod``); no BOS is added. Blank lines are skipped. Empty texts
are skipped and counted.

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
import os
import signal
import sys

import numpy as np

from llama.data.checksums import dataset_checksums
from llama.data.errors import DataError
from llama.data.indexed import IndexedDatasetWriter, remove_stale_temporaries, split_prefix, token_dtype
from llama.data.reading import CHUNK_BYTES, _text_field, chunk_objects, iter_spans
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, format_qnli, prompt_and_answer, split_template
from llama.data.tokenizer import Tokenizer, sha256_file, train_tokenizer, write_json_atomic

MODES = ("text", "sft", "qnli")


# ---------------------------------------------------------------------------------------------- tokenizer texts
def iter_training_texts(paths, mode: str, json_key: str, prompt_template: str):
    """Texts to train a tokenizer on: the documents as they will be tokenized."""
    parts = split_template(prompt_template) if mode != "text" else None
    for path in paths:
        for span in iter_spans(path):
            for obj, i in chunk_objects(span):
                where = f"{path}:{i}"
                if mode == "text":
                    yield _text_field(obj, json_key, where)
                else:
                    if mode == "qnli":
                        obj = format_qnli(obj, where)
                    prompt, answer = prompt_and_answer(obj, parts, where)
                    yield prompt + answer


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def array_encoder(sp):
    """``texts -> [int32 array of ids per text]`` for a SentencePieceProcessor.

    Sentencepiece's pybind11 binding (0.2.3 here) returns numpy arrays itself (``return_type="numpy"``): no Python
    int per token, and one ``np.concatenate`` flattens a chunk. One batch call with ``num_threads=1`` (the workers
    are the parallelism) also saves the per-call wrapper cost: best of 3, it took 0.91x the CPU time of an
    ``EncodeAsIds`` loop on the stdlib corpus of bench_kernels/data.py and 0.83x on 20k short QNLI prompts (an
    ``EncodeAsNumpy`` loop: 0.93x and 1.06x). Older bindings: an ``EncodeAsIds`` loop, each list converted."""
    if hasattr(sp, "EncodeAsNumpy"):
        encode = sp.EncodeAsNumpy
        return lambda texts: encode(list(texts), num_threads=1)
    encode = sp.EncodeAsIds
    return lambda texts: [np.array(encode(t), dtype=np.int32) for t in texts]


def _init_worker(tokenizer_path: str, mode: str, json_key: str, prompt_template: str, append_eod: bool):
    mp = sys.modules.get("multiprocessing")           # imported only when there are worker processes
    if mp is not None and mp.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle (one line, no tracebacks)
    tok = Tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    _WORKER.update(encode=array_encoder(tok.sp), dtype=dtype, mode=mode, json_key=json_key,
                   tail=np.array([tok.eod_id], dtype) if append_eod else None,
                   parts=split_template(prompt_template) if mode != "text" else None)


def _lengths(arrays) -> np.ndarray:
    return np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))


def _concatenate(arrays, dtype) -> np.ndarray:
    # "unsafe" int32 -> uint16 cast: token_dtype picks uint16 only for vocabularies below 65500 ids, and every id
    # sentencepiece returns is below its vocabulary size.
    return np.concatenate(arrays, dtype=dtype, casting="unsafe") if arrays else np.zeros(0, dtype)


def _process_chunk(span):
    """One ``iter_spans`` chunk -> (tokens in the output dtype, lengths, mask or None, empty-document count, bytes).
    Runs in a worker: reads its own byte range, so only the 4-tuple descriptor and compact arrays cross processes."""
    path, _, size, _ = span
    w = _WORKER
    encode, dtype, tail = w["encode"], w["dtype"], w["tail"]
    objs = chunk_objects(span)
    if w["mode"] == "text":
        key, texts = w["json_key"], []
        for obj, i in objs:
            value = obj.get(key)
            if type(value) is not str:
                _text_field(obj, key, f"{path}:{i}")            # raises the precise error
            if value:
                texts.append(value)
        ids = encode(texts)
        lengths = _lengths(ids)
        if tail is not None:
            ids = [a for x in ids for a in (x, tail)]
            lengths += 1
        return _concatenate(ids, dtype), lengths, None, len(objs) - len(texts), size
    prompts, answers = [], []
    for obj, i in objs:
        where = f"{path}:{i}"
        if w["mode"] == "qnli":
            obj = format_qnli(obj, where)
        p, a = prompt_and_answer(obj, w["parts"], where)
        prompts.append(p)
        answers.append(a)
    p_ids, a_ids = encode(prompts), encode(answers)
    n = len(p_ids)
    # counts: prompt, answer (+ eod) per document, interleaved; the mask is 0 over prompts, 1 over answers.
    counts = np.empty(2 * n, np.int64)
    counts[0::2], counts[1::2] = _lengths(p_ids), _lengths(a_ids)
    if tail is not None:
        counts[1::2] += 1
        pieces = [a for p, x in zip(p_ids, a_ids) for a in (p, x, tail)]
    else:
        pieces = [a for p, x in zip(p_ids, a_ids) for a in (p, x)]
    mask = np.repeat(np.tile(np.array([0, 1], np.uint8), n), counts)
    return _concatenate(pieces, dtype), counts[0::2] + counts[1::2], mask, 0, size


def _ordered_results(chunks, workers: int, initargs):
    """Results of _process_chunk in input order, at most 2 * workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*initargs)
        for c in chunks:
            yield _process_chunk(c)
        return
    # fork: a worker needs only this module and sentencepiece, already loaded; spawn would start fresh interpreters
    # that re-import the caller's main module (torch, when called from a training script) in every worker.
    import multiprocessing        # here: ~6 ms of the CLI's start-up that one worker does not need

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
            progress: bool = False, chunk_bytes: int = CHUNK_BYTES, force: bool = True) -> dict:
    """Tokenize JSONL ``inputs`` into ``output_prefix.{bin,idx}`` (+ ``.lossmask`` for sft/qnli); returns the
    metadata also written to ``output_prefix.meta.json`` (with the files' checksums, ``llama.data.checksums``).
    ``chunk_bytes``: input bytes per chunk of work (the output does not depend on it). ``force=False`` refuses to
    replace an existing dataset (the CLI's default). Temporaries of killed runs (``PREFIX.*.tmp-<pid>``, pid gone)
    are removed first."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if mode not in MODES:
        raise DataError(f"unknown mode {mode!r}; known: {MODES}")
    if mode != "text":
        split_template(prompt_template)      # a bad template fails before any work
    for p in inputs:
        if os.path.isdir(p):
            raise DataError(f"{p}: is a directory; --input takes JSONL files (for example {os.path.join(p, '*.jsonl')})")
        if not os.path.isfile(p):
            raise DataError(f"{p}: no such input file")
    prefix = check_output_prefix(os.fspath(output_prefix), force)
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
    chunks = itertools.chain.from_iterable(iter_spans(p, chunk_bytes) for p in inputs)
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
        meta["checksums"] = dataset_checksums(prefix)
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


def check_output_prefix(output_prefix: str, force: bool) -> str:
    """The dataset prefix of ``output_prefix``, after removing killed runs' temporaries; DataError for a directory,
    for a folder that cannot be written, or for an existing dataset without ``force``."""
    prefix = split_prefix(output_prefix)
    if output_prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise DataError(f"--output-prefix {output_prefix} is a directory; give a file prefix inside it (for example "
                        f"{os.path.join(prefix, 'data')}: writes data.bin, data.idx, data.meta.json)")
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise DataError(f"--output-prefix {output_prefix}: cannot write in {folder} ({e.strerror})") from None
    for stale in remove_stale_temporaries(prefix):
        print(f"note: removed {stale} (left by a killed run)", file=sys.stderr)
    existing = [prefix + s for s in (".bin", ".idx") if os.path.exists(prefix + s)]
    if existing and not force:
        raise DataError(f"{' and '.join(existing)} already exist; pass --force to replace the dataset")
    return prefix


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
    if meta["vocab_size"] < vocab_size:
        print(f"note: the trained tokenizer {path} has {meta['vocab_size']} pieces, fewer than --vocab-size "
              f"{vocab_size} (the corpus has too few distinct merges); the dataset's vocabulary is "
              f"{meta['vocab_size']}", file=sys.stderr)
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
    ap.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx")
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
                       progress=not args.no_progress, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); no dataset was written (temporary files removed)", file=sys.stderr)
        return 130
    except OSError as e:                       # the output stopped being writable (disk full, permissions)
        print(f"error: cannot write {e.filename or args.output_prefix}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['prefix']}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']})")
    return 0
