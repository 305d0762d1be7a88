"""Exact resume: runs killed with SIGKILL (at a seeded random moment, and inside a checkpoint write) and resumed with
``--resume`` reproduce the uninterrupted run's loss and gradient-norm sequence bitwise (fp32 and bf16-sr on CPU,
one thread), leave no complete-looking partial checkpoint, and end with bitwise-equal weights."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from proc_utils import INTERRUPTIBLE
from training.checkpoint import list_checkpoints, read_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--threads", "1",
         "--no-progress", "--max-steps", "12", "--checkpoint-every", "3", "--keep-last", "2"]


def cmd(out, precision, resume=False):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--out-dir", out, "--precision", precision, *SMALL] + \
        (["--resume"] if resume else [])


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def run(args, **extra):
    p = subprocess.run(args, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def history(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs]


def final_weights(out):
    _, path = list_checkpoints(out)[-1]
    return torch.load(os.path.join(path, "rank_tp0_dp0.pt"), weights_only=False)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    refs = {}
    for precision in ("fp32", "bf16-sr"):
        out = str(base / precision)
        run(cmd(out, precision))
        refs[precision] = out
    return refs


def check_same_as(reference_out, out):
    ref = history(reference_out)
    got = history(out)
    assert [h[0] for h in got] == list(range(1, 13))
    assert got == ref                                     # bitwise: floats round-trip exactly through JSON
    a, b = final_weights(reference_out), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not glob.glob(os.path.join(out, "checkpoints", "*.tmp-*"))


def test_sigkill_at_random_moments_then_resume(reference, tmp_path):
    rng = random.Random(1234)
    out = str(tmp_path / "killed")
    kills = 0
    for attempt in range(2):                              # two kills, then run to the end
        p = subprocess.Popen(cmd(out, "fp32", resume=bool(list_checkpoints(out))), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(4, 10)                      # kill after `target` logged steps + a random delay
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if len(history(out)) >= target:
                    break
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.1))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        for _, path in list_checkpoints(out):            # whatever is named final is complete
            read_meta(path)
    assert kills >= 1
    run(cmd(out, "fp32", resume=True))
    check_same_as(reference["fp32"], out)


def test_sigkill_during_checkpoint_write_then_resume(reference, tmp_path):
    out = str(tmp_path / "killed_in_save")
    p = subprocess.Popen(cmd(out, "bf16-sr"), cwd=ROOT, env=env(LLAMA_TRAIN_CKPT_SLEEP="6:120"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = threading.Event()

    def watch():
        for line in p.stderr:
            if "checkpoint-write-in-progress" in line:
                seen.set()
    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(120), "the save of step 6 never started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    # the killed save left a temporary directory (rank file written, no meta.json) that is not a checkpoint
    tmps = glob.glob(os.path.join(out, "checkpoints", "step_000006.tmp-*"))
    assert len(tmps) == 1 and not os.path.exists(os.path.join(tmps[0], "meta.json"))
    assert [s for s, _ in list_checkpoints(out)] == [3]
    run(cmd(out, "bf16-sr", resume=True))
    check_same_as(reference["bf16-sr"], out)


def test_ctrl_c_is_one_line_and_resume_stays_exact(reference, tmp_path):
    out = str(tmp_path / "interrupted")
    # the save of step 9 sleeps, so the run cannot finish before the Ctrl-C arrives (it lands between steps 7 and 9
    # or inside that save; either way --resume continues from the newest complete checkpoint)
    p = subprocess.Popen(cmd(out, "bf16-sr"), cwd=ROOT, env=env(LLAMA_TRAIN_CKPT_SLEEP="9:60"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **INTERRUPTIBLE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if len(history(out)) >= 7:               # past the step-6 checkpoint
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted (Ctrl-C); --resume continues from step" in lines[0], err
    run(cmd(out, "bf16-sr", resume=True))
    check_same_as(reference["bf16-sr"], out)
