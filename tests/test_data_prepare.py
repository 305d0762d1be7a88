"""python -m llama.data: tokenizer, JSONL -> .bin/.idx round trip, determinism across workers, SFT masks, and
clear errors for bad input."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from llama.data import (DataError, IndexedDataset, Tokenizer, check_vocab, format_qnli, prepare, qnli_records,
                        train_tokenizer)
from llama.data.prepare import main
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, prompt_and_answer, split_template

WORDS = ["alpha", "beta", "Gamma", "δέλτα", "12345", "x = y + 1", "    indent", "\ttab", "日本語", "émigré", "🙂",
         "def f(a, b):", "return", "#", "\"quoted\""]


def make_texts(n, seed=0):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(1, 60))) + r.choice(["", "\n", "\nend"])
            for _ in range(n)]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = make_texts(400, seed=1) + [f"{format_qnli(r)['input']}\n{format_qnli(r)['output']}"
                                       for r in qnli_records(300)]
    return train_tokenizer(texts, 400, str(d / "tok"))


def test_tokenizer_has_llama2_settings(tok_path):
    tok = Tokenizer(tok_path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert 300 <= tok.vocab_size <= 400
    # Digits split into single pieces; unseen characters survive through byte fallback.
    pieces = tok.sp.EncodeAsPieces("year 2024")
    assert [p for p in pieces if p.isdigit()] == ["2", "0", "2", "4"]
    text = "ŋ unseen Ω ✓ 9876"
    assert tok.decode(tok.encode(text)) == text
    assert any(tok.sp.IsByte(i) for i in tok.encode("✓"))
    assert tok.encode("a", bos=True, eos=True)[0] == 1 and tok.encode("a", bos=True, eos=True)[-1] == 2
    with open(tok_path[:-len(".model")] + ".json") as f:
        meta = json.load(f)
    assert meta["vocab_size"] == tok.vocab_size and len(meta["tokenizer_sha256"]) == 64


def test_check_vocab(tok_path, tmp_path):
    tok = Tokenizer(tok_path)
    assert check_vocab(tok, tok.vocab_size) == tok.vocab_size
    assert check_vocab(tok_path, tok.vocab_size + 64) == tok.vocab_size      # padded embeddings are fine
    with pytest.raises(DataError, match=rf"tokenizer .* has {tok.vocab_size} ids but the model config's "
                                        rf"vocab_size is 256"):
        check_vocab(tok, 256)
    inp = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    prepare(inp, str(tmp_path / "p"), tok_path)
    with pytest.raises(DataError, match="vocab_size is 100"):
        check_vocab(str(tmp_path / "p"), 100)                               # the dataset's meta sidecar


def test_round_trip_text_to_bin_to_text(tok_path, tmp_path):
    texts = make_texts(200, seed=2)
    texts[5] = ""                                                           # empty documents are skipped
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    meta = prepare(inp, str(tmp_path / "out"), tok_path)
    tok = Tokenizer(tok_path)
    ds = IndexedDataset(str(tmp_path / "out"))
    kept = [t for t in texts if t]
    assert len(ds) == len(kept) == meta["documents"] and meta["empty_documents_skipped"] == 1
    for i, text in enumerate(kept):
        ids = ds[i]
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]          # one EOD per document
        assert ids.tolist()[:-1] == tok.encode(text)
        assert tok.decode(ids[:-1]) == text
    assert meta["tokens"] == sum(len(ds[i]) for i in range(len(ds)))
    assert ds.dtype == np.uint16 and meta["vocab_size"] == tok.vocab_size


def test_same_output_whatever_the_worker_count(tok_path, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"body": t} for t in make_texts(1500, seed=3)])
    outs = []
    for workers in (1, 2):
        rc = main(["--input", inp, "--output-prefix", str(tmp_path / f"w{workers}"), "--tokenizer", tok_path,
                   "--json-key", "body", "--workers", str(workers), "--no-progress"])
        assert rc == 0
        outs.append([open(str(tmp_path / f"w{workers}") + ext, "rb").read() for ext in (".bin", ".idx")])
    assert outs[0] == outs[1]
    assert len(IndexedDataset(str(tmp_path / "w2"))) == 1500


def test_cli_end_to_end_with_trained_tokenizer(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(300, seed=4)])
    cmd = [sys.executable, "-m", "llama.data", "--input", inp, "--output-prefix", str(tmp_path / "d"),
           "--train-tokenizer", "--vocab-size", "350", "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(str(tmp_path / "d.tokenizer.model"))
    ds = IndexedDataset(str(tmp_path / "d"))
    assert tok.decode(ds[0][:-1]) == make_texts(300, seed=4)[0]
    mtime = os.stat(tmp_path / "d.tokenizer.model").st_mtime_ns
    assert main(["--input", inp, "--output-prefix", str(tmp_path / "d"), "--train-tokenizer", "--vocab-size",
                 "350", "--no-progress", "--force"]) == 0
    assert os.stat(tmp_path / "d.tokenizer.model").st_mtime_ns == mtime    # the cached tokenizer is reused


def test_sft_answer_only_mask(tok_path, tmp_path):
    recs = [{"input": "Translate: cat", "output": "chat"}, {"input": "2+2=", "output": "4"}]
    inp = write_jsonl(tmp_path / "sft.jsonl", recs)
    assert main(["--input", inp, "--output-prefix", str(tmp_path / "s"), "--tokenizer", tok_path, "--sft",
                 "--prompt-template", "Q: {input}\nA: {output}", "--no-progress"]) == 0
    tok = Tokenizer(tok_path)
    toks, mask = IndexedDataset(str(tmp_path / "s")), IndexedDataset(str(tmp_path / "s.lossmask"))
    assert mask.dtype == np.uint8
    for i, r in enumerate(recs):
        prompt = tok.encode(f"Q: {r['input']}\nA: ")
        answer = tok.encode(r["output"]) + [tok.eos_id]
        assert toks[i].tolist() == prompt + answer
        assert mask[i].tolist() == [0] * len(prompt) + [1] * len(answer)


def test_qnli_format(tok_path, tmp_path):
    rec = {"question": "What is the capital of Ka?", "sentence": "The capital of Ka is Arden.", "label": 0}
    assert format_qnli(rec) == {"input": "qnli question: What is the capital of Ka? sentence: The capital of Ka "
                                         "is Arden.", "output": "entailment"}
    assert format_qnli({**rec, "label": 1})["output"] == "not_entailment"
    assert format_qnli({**rec, "label": "not_entailment"})["output"] == "not_entailment"
    with pytest.raises(DataError, match="label must be"):
        format_qnli({**rec, "label": 2})
    inp = write_jsonl(tmp_path / "q.jsonl", [rec, {**rec, "label": 1}])
    prepare(inp, str(tmp_path / "q"), tok_path, mode="qnli")
    tok = Tokenizer(tok_path)
    ds, mask = IndexedDataset(str(tmp_path / "q")), IndexedDataset(str(tmp_path / "q.lossmask"))
    answer = [t for t, m in zip(ds[1].tolist(), mask[1].tolist()) if m]
    assert tok.decode(answer[:-1]) == "not_entailment" and answer[-1] == tok.eos_id


# ------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, tok_path, content: bytes, match, **kw):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare(str(p), str(tmp_path / "out"), tok_path, **kw)
    # Nothing that looks like a finished dataset, and no temporary file left behind.
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("out"))
    assert left == [], left


def test_malformed_json_names_file_and_line(tmp_path, tok_path):
    _bad(tmp_path, tok_path, b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"bad\.jsonl:3: invalid JSON")


def test_missing_field(tmp_path, tok_path):
    _bad(tmp_path, tok_path, b'{"text": "a"}\n\n{"txt": "b"}\n', r"bad\.jsonl:3: missing field 'text'")
    _bad(tmp_path, tok_path, b'{"input": "a"}\n', r"bad\.jsonl:1: missing field 'output'", mode="sft")
    _bad(tmp_path, tok_path, b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string")
    _bad(tmp_path, tok_path, b'[1, 2]\n', r"bad\.jsonl:1: expected a JSON object")


def test_non_utf8(tmp_path, tok_path):
    _bad(tmp_path, tok_path, b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8")


def test_empty_corpus(tmp_path, tok_path):
    _bad(tmp_path, tok_path, b"", r"bad\.jsonl: empty corpus")
    _bad(tmp_path, tok_path, b'{"text": ""}\n\n', r"bad\.jsonl: empty corpus")


def test_errors_from_worker_processes(tmp_path, tok_path):
    lines = b"".join(b'{"text": "line %d"}\n' % i for i in range(3000)) + b'{"text": oops}\n'
    _bad(tmp_path, tok_path, lines, r"bad\.jsonl:3001: invalid JSON", workers=2)


def test_cli_reports_errors_without_traceback(tmp_path, tok_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "a"\n')
    assert main(["--input", str(p), "--output-prefix", str(tmp_path / "o"), "--tokenizer", tok_path,
                 "--no-progress"]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_bad_template_and_tokenizer(tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "a.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"must contain \{output\} exactly once"):
        prepare(inp, str(tmp_path / "o"), tok_path, mode="sft", prompt_template="{input}")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model: not a sentencepiece model"):
        Tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(DataError, match=r"vocab_size 100 is below"):
        train_tokenizer(["abc"], 100, str(tmp_path / "t"))
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(["", "  \n"], 300, str(tmp_path / "t"))


def test_cli_path_does_not_import_torch():
    # `python -m llama.data` start-up time: preparation, tokenizer and indexed files must not pull in torch.
    import subprocess
    import sys as _sys
    code = ("import sys, llama.data.prepare, llama.data.tokenizer, llama.data.indexed, llama.data; "
            "from llama.data import prepare; assert callable(prepare); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ------------------------------------------------------------------------------------ chunks and workers
def test_spans_cover_the_file_in_whole_lines(tmp_path):
    from llama.data.prepare import iter_spans
    r = random.Random(5)
    lines = [b"x" * r.choice([0, 1, 7, 40, 130]) for _ in range(300)] + [b"y" * 500]     # one line > a block
    for last in (b"", b"\n"):                                       # with and without a final newline
        content = b"\n".join(lines) + last
        p = tmp_path / "f.jsonl"
        p.write_bytes(content)
        spans = list(iter_spans(str(p), chunk_bytes=64))
        assert len(spans) > 20
        assert b"".join(content[o:o + n] for _, o, n, _ in spans) == content
        for _, offset, length, lineno in spans:
            assert lineno == 1 + content.count(b"\n", 0, offset)     # line numbers from the bytes themselves
            assert offset == 0 or content[offset - 1:offset] == b"\n"
            assert length > 0


@pytest.mark.parametrize("mode", ["text", "sft"])
def test_many_small_chunks_same_bytes_for_1_2_3_workers(tok_path, tmp_path, mode):
    texts = make_texts(600, seed=7)
    texts[10] = texts[300] = ""
    if mode == "text":
        recs = [{"text": t} for t in texts]
    else:
        recs = [{"input": t[:20], "output": t[20:]} for t in texts]
    content = "".join(json.dumps(x, ensure_ascii=False) + ("\n\n" if i % 50 == 0 else "\n")
                      for i, x in enumerate(recs))
    inp = tmp_path / "in.jsonl"
    inp.write_text(content, encoding="utf-8")
    exts = (".bin", ".idx") + ((".lossmask.bin", ".lossmask.idx") if mode == "sft" else ())
    outs = []
    for workers in (1, 2, 3):
        prefix = str(tmp_path / f"w{workers}")
        meta = prepare(str(inp), prefix, tok_path, mode=mode, workers=workers, chunk_bytes=1500)
        outs.append([open(prefix + e, "rb").read() for e in exts])
    assert outs[0] == outs[1] == outs[2]
    assert len(content.encode()) // 1500 >= 40                      # many chunks, cut inside documents' lines
    # Against sentencepiece called per document: nothing lost or doubled at chunk boundaries.
    tok, ds = Tokenizer(tok_path), IndexedDataset(str(tmp_path / "w3"))
    if mode == "text":
        kept = [t for t in texts if t]
        assert len(ds) == len(kept) == meta["documents"] and meta["empty_documents_skipped"] == 2
        for i, t in enumerate(kept):
            assert ds[i].tolist() == tok.encode(t, eos=True)
    else:
        mask, parts = IndexedDataset(str(tmp_path / "w3.lossmask")), split_template(DEFAULT_PROMPT_TEMPLATE)
        assert len(ds) == len(recs) == meta["documents"]
        for i, rec in enumerate(recs):
            prompt, answer = prompt_and_answer(rec, parts, "rec")
            prompt, answer = tok.encode(prompt), tok.encode(answer, eos=True)
            assert ds[i].tolist() == prompt + answer
            assert mask[i].tolist() == [0] * len(prompt) + [1] * len(answer)


@pytest.mark.parametrize("bad, match", [
    (b'{"text": oops}', r"bad\.jsonl:2401: invalid JSON \(Expecting value at column 10\)"),
    (b'{"text": "caf\xe9 au lait"}', r"bad\.jsonl:2401: not valid UTF-8 \(byte 13: b'\\xe9'\)"),
    (b'{"txt": "a"}', r"bad\.jsonl:2401: missing field 'text'"),
    (b'"just a string"', r"bad\.jsonl:2401: expected a JSON object, got str"),
])
def test_bad_line_deep_in_a_later_chunk_names_its_line(tmp_path, tok_path, bad, match):
    # Blank lines and multi-byte characters before the bad line: line numbers are counted, not inferred.
    good = [b'{"text": "line %d \xc3\xa9\xe6\x97\xa5"}' % i if i % 7 else b"" for i in range(1, 2401)]
    content = b"\n".join(good + [bad] + [b'{"text": "after"}'] * 50) + b"\n"
    for workers in (1, 2):
        _bad(tmp_path, tok_path, content, match, workers=workers, chunk_bytes=700)


def test_sentencepiece_without_numpy_output(tok_path, tmp_path, monkeypatch):
    # Older sentencepiece bindings have no EncodeAsNumpy: the ids-list path must write the same bytes.
    prep_module = sys.modules["llama.data.prepare"]           # (llama.data.prepare is also the function's name)

    class IdsOnly:
        def __init__(self, sp):
            self.EncodeAsIds = sp.EncodeAsIds

    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(300, seed=8)])
    prepare(inp, str(tmp_path / "a"), tok_path, chunk_bytes=4000)
    real = prep_module.array_encoder
    monkeypatch.setattr(prep_module, "array_encoder", lambda sp: real(IdsOnly(sp)))
    prepare(inp, str(tmp_path / "b"), tok_path, chunk_bytes=4000)
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "a") + ext, "rb").read() == open(str(tmp_path / "b") + ext, "rb").read()
