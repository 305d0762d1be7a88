"""Bad inputs and faults of ``train.py`` (issue 15): each test names the case of docs/robustness.md it covers.
In-process where the run stops before training (train_inproc), subprocesses where a run must be interrupted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from proc_utils import INTERRUPTIBLE
from test_train import ROOT, SMALL, _err, metrics, small_run, train, train_inproc  # noqa: F401 (fixture)


def strict_json_lines(path):
    """metrics.jsonl parsed as strict JSON: NaN / Infinity literals are errors."""
    def refuse(c):
        raise ValueError(f"non-JSON constant {c}")
    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh]


# ---------------------------------------------------------------------- configuration values
@pytest.mark.parametrize("flag,value,msg", [
    ("--lr", "inf", "command line: lr = inf must be a finite number"),
    ("--lr", "nan", "command line: lr = nan must be a finite number"),
    ("--grad-clip", "inf", "command line: grad_clip = inf must be a finite number"),
    ("--peak-tflops=-inf", None, "command line: peak_tflops = -inf must be a finite number"),
    ("--weight-decay", "-0.1", "weight_decay must be >= 0"),
    ("--threads", "0", "threads must be an integer >= 1, got 0"),
    ("--seq-len", "256", "seq_len 256 exceeds the model's max_seq_len 128"),
])
def test_bad_numeric_flags_are_refused(capsys, tmp_path, flag, value, msg):
    args = [a for a in SMALL if a not in ("--threads", "1")] if flag == "--threads" else list(SMALL)
    if flag == "--seq-len":
        args = args[2:]
    err = _err(train_inproc(capsys, *([flag] if value is None else [flag, value]), "--out-dir", tmp_path / "r", *args))
    assert msg in err, err
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("toml,msg", [
    ('lr = "0.001"', "lr = '0.001' must be a number, got str"),
    ("model_overrides = 5", "model_overrides = 5 must be a table, got int"),
    ("max_steps = 2.5", "max_steps = 2.5 must be an integer, got float"),
    ('compile = "yes"', "compile = 'yes' must be true or false, got str"),
    ("data = [1, 2]", "data entries must be strings, got 1"),
    ("lr = inf", "lr = inf must be a finite number"),
])
def test_toml_values_are_type_checked(capsys, tmp_path, toml, msg):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'preset = "tiny"\n{toml}\n')
    err = _err(train_inproc(capsys, "--config", cfg, "--out-dir", tmp_path / "r"))
    assert msg in err and str(cfg) in err, err


def test_nan_steps_write_strict_json(tmp_path):
    out = str(tmp_path / "nan")
    train("--precision", "fp32", "--max-steps", 4, "--out-dir", out, *SMALL, env={"LLAMA_TRAIN_FAULT_NAN_STEPS": "2"})
    recs = strict_json_lines(os.path.join(out, "metrics.jsonl"))
    assert recs[1]["skipped"] == 1 and recs[1]["loss"] is None and recs[1]["grad_norm"] is None
    assert recs[-1]["skipped_total"] == 1 and all(isinstance(r["loss"], float) for r in recs if not r["skipped"])


# ---------------------------------------------------------------------- checkpoints
def _copy(small_run, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(small_run[0], out)
    return out


def test_flipped_checkpoint_bytes_are_detected_and_fallback_is_explicit(capsys, small_run, tmp_path):
    out = _copy(small_run, tmp_path)
    last = os.path.join(out, "checkpoints", "step_000008", "rank_tp0_dp0.pt")
    size = os.path.getsize(last)
    with open(last, "r+b") as fh:                 # same size, a few bytes changed deep inside the tensor data
        fh.seek(size // 2)
        b = fh.read(4)
        fh.seek(size // 2)
        fh.write(bytes(x ^ 0x5A for x in b))
    args = ("--precision", "fp32", "--max-steps", 8, "--resume", "--out-dir", out, *SMALL)
    err = _err(train_inproc(capsys, *args))
    assert last in err and "sha256" in err and "step_000004: pass --resume-fallback" in err, err
    res = train_inproc(capsys, *args, "--resume-fallback")
    assert res.returncode == 0, res.stderr
    assert "resuming from the newest intact checkpoint" in res.stderr and "step_000004" in res.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    from training.checkpoint import verify
    assert verify(os.path.join(out, "checkpoints", "step_000008"))["step"] == 8     # rewritten intact


def test_resume_with_changed_hparams_is_refused_or_applied_explicitly(capsys, small_run, tmp_path):
    out = _copy(small_run, tmp_path)
    err = _err(train_inproc(capsys, "--precision", "fp32", "--max-steps", 10, "--lr", "1e-3", "--resume",
                            "--out-dir", out, *SMALL))
    assert "lr: checkpoint 0.003 != now 0.001" in err and "max_steps: checkpoint 8 != now 10" in err, err
    assert "--allow-hparam-change" in err
    res = train_inproc(capsys, "--precision", "fp32", "--max-steps", 10, "--lr", "1e-3", "--resume",
                       "--allow-hparam-change", "--out-dir", out, *SMALL)
    assert res.returncode == 0, res.stderr
    recs = metrics(out)
    event = [r for r in recs if "event" in r]
    assert event == [{"step": 8, "event": "hparams_changed",
                      "changes": {"lr": {"checkpoint": 0.003, "now": 0.001},
                                  "max_steps": {"checkpoint": 8, "now": 10}}}]
    from training.optim import lr_lambda
    f = lr_lambda(20, 10, 0.1)                   # the new schedule (logged lr: after the step's scheduler.step)
    assert recs[-1]["step"] == 10 and recs[-1]["lr"] == pytest.approx(1e-3 * f(10))


# ---------------------------------------------------------------------- the run directory
def test_second_run_on_one_out_dir_is_refused(tmp_path):
    out = str(tmp_path / "shared")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--precision", "fp32", "--max-steps",
                              "400", "--out-dir", out, *SMALL], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **INTERRUPTIBLE)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = train("--precision", "fp32", "--max-steps", 2, "--out-dir", out, *SMALL, check=False)
        assert second.returncode == 2
        assert f"is in use by another train.py (pid {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None                # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "interrupted (Ctrl-C)" in err and "Traceback" not in err, err


def test_run_killed_before_its_first_checkpoint_can_start_fresh(tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    p = train("--precision", "fp32", "--max-steps", 2, "--out-dir", out, *SMALL)
    assert "stopped before its first checkpoint; starting afresh" in p.stderr
    assert [r["step"] for r in metrics(str(out))] == [1, 2]


def test_out_dir_that_becomes_unwritable_mid_run_is_one_line(tmp_path):
    out = str(tmp_path / "gone")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--precision", "fp32", "--max-steps", "300",
                          "--checkpoint-every", "100", "--out-dir", out, *SMALL], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.rename(out, out + ".moved")                # the directory is gone and a file stands in its place: no
    with open(out, "w") as fh:                    # checkpoint can be created there (root ignores permissions)
        fh.write("not a directory")
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --out-dir {out}: cannot write"), err


def test_corrupt_safetensors_names_the_file(capsys, tmp_path):
    import torch

    import llama
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    llama.to_hf(llama.Llama(llama.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1,
                                              num_heads=2, num_kv_heads=2, max_seq_len=64)), hf)
    f = hf / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"{not json header"
    f.write_bytes(bytes(data))
    res = train_inproc(capsys, "--init-from-hf", hf, "--out-dir", tmp_path / "b", *SMALL)
    assert res.returncode == 2 and str(f) in res.stderr and "corrupt" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
