"""The embedded default corpus: built from the standard library and a generated QNLI task, cached, lock-safe."""
import json
import multiprocessing
import os

import numpy as np
import pytest

from llama.data import (DEFAULT_VOCAB_SIZE, BatchLoader, IndexedDataset, PackedDataset, Tokenizer, check_vocab,
                        prepare_default_data, qnli_records)
from llama.data.default_corpus import stdlib_files


def _build(cache_dir, q):
    q.put(prepare_default_data(cache_dir, vocab_size=512, corpus_bytes=300_000, qnli_count=500)["tokenizer"])


def test_small_default_builds_once_concurrently_and_is_cached(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(cache, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert q.get() == q.get()
    with open(os.path.join(cache, "manifest.json")) as f:
        manifest = json.load(f)
    stamps = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in manifest["files"]}
    data = prepare_default_data(cache, vocab_size=512, corpus_bytes=300_000, qnli_count=500)
    assert {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in manifest["files"]} == stamps  # reused
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]
    tok = Tokenizer(data["tokenizer"])
    assert check_vocab(tok, 512) == tok.vocab_size
    stdlib, qnli = (p for p, _ in data["sources"])
    # The stdlib source decodes back to the chosen files; the QNLI source has answer-only masks.
    first = stdlib_files(300_000)[0][1]
    assert tok.decode(IndexedDataset(stdlib)[0][:-1]) == first
    mask = IndexedDataset(qnli + ".lossmask")
    toks = IndexedDataset(qnli)
    answer = [t for t, m in zip(toks[0].tolist(), mask[0].tolist()) if m]
    assert tok.decode(answer[:-1]) in ("entailment", "not_entailment")
    ds = PackedDataset(data["sources"], 64, seed=0, vocab_size=512)
    x, y = BatchLoader(ds, 4).next()
    assert x.shape == (4, 64) and int(x.max()) < tok.vocab_size
    # A damaged cache file is detected by the manifest and rebuilt.
    with open(stdlib + ".bin", "r+b") as f:
        f.write(b"\xff\xff")
    prepare_default_data(cache, vocab_size=512, corpus_bytes=300_000, qnli_count=500)
    assert tok.decode(IndexedDataset(stdlib)[0][:-1]) == first


def test_qnli_generator_is_deterministic_and_balanced():
    a, b = qnli_records(2000, seed=0), qnli_records(2000, seed=0)
    assert a == b and a != qnli_records(2000, seed=1)
    labels = np.array([r["label"] for r in a])
    assert 0.35 < labels.mean() < 0.65
    for r in a[:200]:
        # entailment exactly when the sentence states the asked attribute of the asked country
        attr, country = r["question"].rstrip("?").split("the ", 1)[1].rsplit(" of ", 1)
        states = (f"The {attr} of {country} is" in r["sentence"] or
                  r["sentence"].startswith(f"{country} is known for its {attr},"))
        assert states == (r["label"] == 0)


def test_real_default(tmp_path):
    data = prepare_default_data(str(tmp_path / "d"))
    assert Tokenizer(data["tokenizer"]).vocab_size == DEFAULT_VOCAB_SIZE
    ds = PackedDataset(data["sources"], 128, seed=0, vocab_size=DEFAULT_VOCAB_SIZE)
    assert len(ds) > 5000
    with pytest.raises(Exception, match="vocab_size is 256"):
        check_vocab(data["tokenizer"], 256)
