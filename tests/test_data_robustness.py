"""Bad inputs and faults of the data pipeline (issue 15; docs/robustness.md): recorded checksums of prepared
datasets and their guarantee, the tokenizer a dataset was made with, and the ``python -m llama.data`` CLI's
one-line errors."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama.data import DataError, PackedDataset, prepare, train_tokenizer
from llama.data import checksums
from llama.data.prepare import main
from proc_utils import INTERRUPTIBLE
from test_data_prepare import make_texts, tok_path, write_jsonl  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def dataset(tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(200, seed=3)])
    prefix = str(tmp_path / "d")
    prepare(inp, prefix, tok_path)
    return prefix


def swap_tokens(path, at):
    """Exchange two token ids of a uint16 .bin in place: same size, every id still inside the vocabulary."""
    a = np.memmap(path, dtype=np.uint16, mode="r+")
    i = at % (len(a) - 1)
    j = next(k for k in range(i + 1, len(a)) if a[k] != a[i])
    a[i], a[j] = a[j], a[i]
    a.flush()
    del a


def test_modified_bin_with_in_range_ids_is_detected(dataset):
    PackedDataset([dataset], 32, vocab_size=400)                  # intact: opens
    swap_tokens(dataset + ".bin", 100)
    with pytest.raises(DataError, match=r"d\.bin: bytes 0\.\.\d+ differ from the checksum in .*d\.meta\.json"):
        PackedDataset([dataset], 32, vocab_size=400)
    PackedDataset([dataset], 32, vocab_size=400, verify="off")    # explicitly unchecked


def test_modified_idx_and_size_are_detected(dataset):
    with open(dataset + ".bin", "ab") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(DataError, match="bytes, .* records"):
        checksums.verify_dataset(dataset)


def test_fast_check_samples_large_bins_and_full_checks_all(tmp_path, tok_path, monkeypatch):
    """Above FULL_CHECK_BYTES the fast check reads the first, last and SAMPLED_BLOCKS spread blocks: a change in
    another block passes it (the documented limit) and fails the full check."""
    monkeypatch.setattr(checksums, "BLOCK_BYTES", 256)
    monkeypatch.setattr(checksums, "FULL_CHECK_BYTES", 1024)
    monkeypatch.setattr(checksums, "SAMPLED_BLOCKS", 2)
    inp = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in make_texts(400, seed=5)])
    prefix = str(tmp_path / "big")
    meta = prepare(inp, prefix, tok_path)
    n = len(meta["checksums"][".bin"]["blocks"])
    sampled = checksums._blocks_to_check(n, os.path.getsize(prefix + ".bin"), "fast")
    assert 0 in sampled and n - 1 in sampled and len(sampled) == 4 < n
    unsampled = next(b for b in range(n) if b not in sampled)
    swap_tokens(prefix + ".bin", unsampled * 256 // 2 + 3)
    assert checksums.verify_dataset(prefix, "fast")
    with pytest.raises(DataError, match=f"bytes {unsampled * 256}\\.\\."):
        checksums.verify_dataset(prefix, "full")


def test_train_refuses_modified_data_and_another_tokenizer(capsys, dataset, tok_path, tmp_path):
    from test_train import SMALL, _err, train_inproc
    base = ("--data", dataset, "--config", "tiny", "--out-dir", tmp_path / "r", *SMALL)
    other = train_tokenizer(make_texts(300, seed=9), 400, str(tmp_path / "other"))
    err = _err(train_inproc(capsys, *base, "--tokenizer", other))
    assert f"tokenizer {other}" in err and "is not the one" in err and dataset in err, err
    swap_tokens(dataset + ".bin", 10)
    err = _err(train_inproc(capsys, *base, "--tokenizer", tok_path))
    assert err.startswith("train.py: error: data: ") and "d.bin: bytes" in err, err


# ---------------------------------------------------------------------- python -m llama.data
def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args] + ["--no-progress"])
    return code, capsys.readouterr().err


def test_cli_input_directory_and_output_prefix_errors(capsys, tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    code, err = cli(capsys, "--input", tmp_path, "--output-prefix", tmp_path / "x", "--tokenizer", tok_path)
    assert code == 2 and f"{tmp_path}: is a directory; --input takes JSONL files" in err
    (tmp_path / "outdir").mkdir()
    code, err = cli(capsys, "--input", inp, "--output-prefix", tmp_path / "outdir", "--tokenizer", tok_path)
    assert code == 2 and "is a directory; give a file prefix inside it" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = cli(capsys, "--input", inp, "--output-prefix", blocker / "d", "--tokenizer", tok_path)
    assert code == 2 and f"cannot write in {blocker}" in err and len(err.strip().splitlines()) == 1, err


def test_cli_replacing_a_dataset_needs_force_and_stale_temporaries_go(capsys, tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(20)])
    prefix = tmp_path / "d"
    assert cli(capsys, "--input", inp, "--output-prefix", prefix, "--tokenizer", tok_path)[0] == 0
    before = (tmp_path / "d.bin").read_bytes()
    code, err = cli(capsys, "--input", inp, "--output-prefix", prefix, "--tokenizer", tok_path)
    assert code == 2 and "already exist; pass --force to replace the dataset" in err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                         # a pid that no longer runs
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, kept = tmp_path / f"d.bin.tmp-{dead.pid}", tmp_path / f"d.idx.tmp-{live.pid}"
        stale.write_bytes(b"partial")
        kept.write_bytes(b"still being written")
        code, err = cli(capsys, "--input", inp, "--output-prefix", prefix, "--tokenizer", tok_path, "--force")
        assert code == 0 and f"removed {stale}" in err
        assert not stale.exists() and kept.exists()
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "d.bin").read_bytes() == before


def test_cli_reports_a_tokenizer_smaller_than_asked(capsys, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(30, seed=2)])
    code, err = cli(capsys, "--input", inp, "--output-prefix", tmp_path / "d", "--train-tokenizer", "--vocab-size",
                    "6000")
    assert code == 0, err
    assert "fewer than --vocab-size 6000" in err


def test_cli_ctrl_c_is_one_line_and_leaves_no_files(tmp_path, tok_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(60000, seed=7)])
    p = subprocess.Popen([sys.executable, "-m", "llama.data", "--input", inp, "--output-prefix", str(tmp_path / "d"),
                          "--tokenizer", tok_path, "--workers", "2", "--no-progress"], cwd=ROOT,
                         stderr=subprocess.PIPE, text=True, **INTERRUPTIBLE)
    deadline = time.monotonic() + 60
    while not any(".tmp-" in n for n in os.listdir(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip() == "error: interrupted (Ctrl-C); no dataset was written (temporary files removed)", err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
