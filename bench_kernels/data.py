"""Tokenisation throughput of the data preparation (``python -m llama.data``) vs sentencepiece called directly.

    python -m bench_kernels.data [--tokenizer PATH] [--mb 12] [--repeat 2]

Corpus: the standard library's Python sources (one JSONL document per file, cycled to about ``--mb`` MB;
deterministic). Tokenizer: ``--tokenizer`` (e.g. Llama 2's tokenizer.model) or the default corpus's
(``llama.data.DEFAULT_VOCAB_SIZE`` pieces, trained into a temporary folder). MB/s = UTF-8 bytes of document text
per second of wall time (the JSONL file is slightly larger: quoting). Rows:
- direct loop: ``sp.EncodeAsIds(text)`` per document in a Python loop over the already parsed texts (baseline);
- array encoder: what the workers call to tokenize (``llama.data.prepare.array_encoder``: one
  ``sp.EncodeAsNumpy(texts, num_threads=1)`` where sentencepiece has it), for information;
- direct batch: ``sp.Encode(texts, num_threads=k)`` (for information);
- worker function: what one worker does per chunk (read its byte range from the page cache, UTF-8 check, JSON
  parse, encode, join into the output dtype), in this process: the per-worker cost without the pool;
- prepare(): the in-process function the CLI runs (read, UTF-8 check, JSON parse, encode, write .bin/.idx);
- CLI: ``python -m llama.data`` end to end, interpreter start-up and imports included.
Two rates per row: wall (MB per wall second) and CPU (MB per CPU second of this process and its worker
processes: the per-worker rate, insensitive to other load on shared cores). Target: prepare() >= 0.9x the direct
loop per worker, judged on the CPU rate (and shown for wall). Best of ``--repeat`` interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import sentencepiece as spm

from llama.data import prepare, prepare_default_data
from llama.data.default_corpus import stdlib_files
from llama.data.prepare import _init_worker, _process_chunk, array_encoder, iter_spans
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE

TARGET = 0.9


def _cpu_seconds():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_time(fn, repeat):
    """(best wall seconds, best CPU seconds of this process and its finished children) over repeat runs."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu_seconds()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, _cpu_seconds() - c)
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="sentencepiece model (default: train the default corpus's)")
    ap.add_argument("--mb", type=float, default=12.0, help="corpus size in MB of text")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        tok = args.tokenizer or prepare_default_data(os.path.join(tmp, "default"))["tokenizer"]
        files = [text for _, text in stdlib_files(corpus_bytes=1)]      # every eligible file
        texts, size = [], 0
        while size < args.mb * 1e6:
            for t in files:
                texts.append(t)
                size += len(t.encode("utf-8"))
                if size >= args.mb * 1e6:
                    break
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        mb = size / 1e6
        sp = spm.SentencePieceProcessor(model_file=tok)

        def loop():
            for t in texts:
                sp.EncodeAsIds(t)

        init_args = (tok, "text", "text", DEFAULT_PROMPT_TEMPLATE, True)
        chunks = list(iter_spans(jsonl))
        encode_arrays = array_encoder(sp)

        def worker_fn():
            _init_worker(*init_args)
            for c in chunks:
                _process_chunk(c)

        measures = [("direct loop (baseline)", 1, loop), ("array encoder", 1, lambda: encode_arrays(texts))]
        for k in (1, 2):
            measures.append((f"direct batch num_threads={k}", k,
                             lambda k=k: sp.Encode(texts, out_type=int, num_threads=k)))
        measures.append(("worker function", 1, worker_fn))
        for w in (1, 2):
            measures.append(("prepare()", w, lambda w=w: prepare(jsonl, os.path.join(tmp, f"p{w}"), tok, workers=w)))
        for w in (1, 2):
            cmd = [sys.executable, "-m", "llama.data", "--input", jsonl, "--output-prefix", os.path.join(tmp, f"c{w}"),
                   "--tokenizer", tok, "--workers", str(w), "--no-progress"]
            measures.append(("CLI end to end", w, lambda cmd=cmd: subprocess.run(cmd, check=True, capture_output=True)))
        # Rounds interleave all paths so that load from other processes hits them alike; best per path.
        best = {}
        for _ in range(args.repeat):
            for name, w, fn in measures:
                wall, cpu = best_time(fn, 1)
                old = best.get((name, w), (float("inf"), float("inf")))
                best[(name, w)] = (min(old[0], wall), min(old[1], cpu))
        rows = [(name, w, mb / best[(name, w)][0], mb / best[(name, w)][1]) for name, w, _ in measures]
        startup, _ = best_time(lambda: subprocess.run([sys.executable, "-c", "import llama.data"], check=True),
                               args.repeat)
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB of text; tokenizer {os.path.basename(tok)} "
          f"(vocab {sp.GetPieceSize()}); {os.cpu_count()} CPUs; best of {args.repeat} interleaved rounds; "
          f"CLI start-up (python -c 'import llama.data') {startup:.2f} s")
    direct_wall, direct_cpu = rows[0][2], rows[0][3]
    print(f"{'path':28s} {'workers':>7s} {'wall MB/s':>10s} {'/worker':>8s} {'vs direct':>9s} "
          f"{'CPU MB/s':>9s} {'vs direct':>9s}")
    for name, w, wall, cpu in rows:
        print(f"{name:28s} {w:7d} {wall:10.2f} {wall / w:8.2f} {wall / w / direct_wall:8.2f}x "
              f"{cpu:9.2f} {cpu / direct_cpu:8.2f}x")
    for w in (1, 2):
        r = [x for x in rows if x[0] == "prepare()" and x[1] == w][0]
        ratio = r[3] / direct_cpu
        print(f"target: prepare() with {w} worker(s), CPU rate per worker >= {TARGET}x the direct loop: "
              f"{ratio:.2f}x ({'meets' if ratio >= TARGET else 'misses'}); wall per worker {r[2] / w / direct_wall:.2f}x")

if __name__ == "__main__":
    main()
