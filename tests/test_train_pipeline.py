"""``train.py --pp`` under torchrun on CPU (gloo), fp32, a 4-layer tiny model:

- PP=2 with interleaved 1F1B (2 virtual stages per rank) gives the single-process run's loss sequence (relative
  difference <= 1e-6: the stages run the same arithmetic; the gradient norm's sum of squares is reduced over the
  stages in another order, so later steps may differ in the last bits);
- its step-3 checkpoint resumed under PP=1 (resharded) continues on the single-process curve (<= 1e-6), and
  resumed under PP=2 reproduces the uninterrupted PP=2 run bitwise (losses, gradient norms, final weights);
- a layout the model cannot take is refused before anything starts (exit 2, no run directory).
"""
import json
import os
import shutil
import subprocess
import sys

import torch

from training.checkpoint import list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--precision", "fp32", "--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--threads", "1", "--no-progress", "--max-steps", "6", "--checkpoint-every", "3", "--keep-last", "3"]
PP2 = ["--pp", "2", "--pp-schedule", "interleaved", "--virtual-stages", "2"]
RTOL = 1e-6


def launch(nproc, *args, ok=True):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    p = subprocess.run([*pre, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def history(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


def resume_copy(src, dst, step):
    """A run directory holding only ``src``'s checkpoint of ``step`` (what a run killed after it would leave)."""
    path = dict(list_checkpoints(src))[step]
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copytree(path, os.path.join(dst, "checkpoints", os.path.basename(path)))


def weights(out, files):
    _, path = list_checkpoints(out)[-1]
    merged = {}
    for f in files:
        merged.update(torch.load(os.path.join(path, f), weights_only=False)["model"])
    return merged


def close(a, b):
    return abs(a - b) <= RTOL * abs(b)


def test_pp2_interleaved_matches_single_process_and_resumes_resharded(tmp_path):
    toml = tmp_path / "four.toml"
    toml.write_text('preset = "tiny"\n[model_overrides]\nnum_layers = 4\n')
    ref, pp = str(tmp_path / "ref"), str(tmp_path / "pp2")
    launch(1, "--config", toml, "--out-dir", ref, *COMMON)
    launch(2, "--config", toml, "--out-dir", pp, *COMMON, *PP2)
    h_ref, h_pp = history(ref), history(pp)
    assert sorted(h_pp) == sorted(h_ref) == [1, 2, 3, 4, 5, 6]
    for s in h_ref:
        assert close(h_pp[s]["loss"], h_ref[s]["loss"]), (s, h_pp[s], h_ref[s])
        assert abs(h_pp[s]["grad_norm"] - h_ref[s]["grad_norm"]) <= 1e-5 * h_ref[s]["grad_norm"], s
    assert h_ref[6]["loss"] < h_ref[1]["loss"]
    files = ["rank_tp0_dp0.pt", "rank_tp0_pp1_dp0.pt"]
    w_pp, w_ref = weights(pp, files), weights(ref, ["rank_tp0_dp0.pt"])
    assert sorted(w_pp) == sorted(w_ref)
    for k in w_ref:
        torch.testing.assert_close(w_pp[k], w_ref[k], rtol=1e-4, atol=1e-6)     # as test_train_parallel.py

    # PP 2 -> 1: the step-3 checkpoint of the pipeline run, resharded into one process
    one = str(tmp_path / "to_pp1")
    resume_copy(pp, one, 3)
    launch(1, "--config", toml, "--out-dir", one, *COMMON, "--resume")
    h_one = history(one)
    assert sorted(h_one) == [4, 5, 6]
    for s in h_one:
        assert close(h_one[s]["loss"], h_ref[s]["loss"]), (s, h_one[s], h_ref[s])

    # the same layout: bitwise the uninterrupted pipeline run
    again = str(tmp_path / "pp2_again")
    resume_copy(pp, again, 3)
    launch(2, "--config", toml, "--out-dir", again, *COMMON, *PP2, "--resume")
    h_again = history(again)
    for s in (4, 5, 6):
        assert (h_again[s]["loss"], h_again[s]["grad_norm"]) == (h_pp[s]["loss"], h_pp[s]["grad_norm"]), s
    w_again = weights(again, files)
    assert all(torch.equal(w_again[k], w_pp[k]) for k in w_pp)


def test_bad_pipeline_layout_refused_before_anything_starts(tmp_path):
    out = tmp_path / "never"
    p = launch(2, "--out-dir", out, *COMMON, *PP2, ok=False)     # tiny has 2 layers: 4 stages impossible
    assert p.returncode != 0
    assert "pp 2 x 2 virtual stage(s) = 4 stages, but num_layers is only 2" in p.stderr, p.stderr[-2000:]
    assert not out.exists()
