"""``train.py`` under torchrun on CPU (gloo): DP=2 (plain and ZeRO-1) equals DP=1 for the same global batch, and TP=2 with sequence
parallelism keeps the replicated RMSNorm weights bit-identical across ranks after 50 ``bf16-sr`` steps."""
import json
import os
import subprocess
import sys

import torch

from training.checkpoint import list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--threads", "1", "--no-progress"]


def launch(nproc, *args):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    p = subprocess.run([*pre, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def history(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def rank_state(out, tp, dp):
    _, path = list_checkpoints(out)[-1]
    return torch.load(os.path.join(path, f"rank_tp{tp}_dp{dp}.pt"), weights_only=False)


def test_dp2_equals_dp1_for_the_same_global_batch(tmp_path):
    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    common = ["--precision", "fp32", "--max-steps", 6, *SMALL]
    launch(1, "--out-dir", one, *common)                 # micro 4 x accum 2
    launch(2, "--out-dir", two, *common)                 # micro 4 x dp 2
    h1, h2 = history(one), history(two)
    for a, b in zip(h1, h2):                             # fp32; only the summation order differs
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
    w1 = rank_state(one, 0, 0)["model"]
    for dp in (0, 1):
        w2 = rank_state(two, 0, dp)["model"]
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert torch.equal(rank_state(two, 0, 0)["model"]["norm.weight"], rank_state(two, 0, 1)["model"]["norm.weight"])
    # ZeRO-1 (optimizer state sharded over DP) computes the same steps
    zero = str(tmp_path / "zero1")
    launch(2, "--out-dir", zero, "--zero1", *common)
    for a, b in zip(h1, history(zero)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)


def test_tp2_replicated_weights_stay_bit_identical_under_bf16_sr(tmp_path):
    out = str(tmp_path / "tp2")
    launch(2, "--out-dir", out, "--tp", 2, "--sequence-parallel", "--precision", "bf16-sr", "--max-steps", 50, *SMALL)
    s0, s1 = rank_state(out, 0, 0)["model"], rank_state(out, 1, 0)["model"]
    norms = [k for k in s0 if k.endswith("norm.weight")]
    assert len(norms) == 2 * 2 + 1                       # two per layer + the final norm
    for k in norms:
        assert s0[k].dtype == torch.bfloat16
        assert torch.equal(s0[k], s1[k]), k
        assert not torch.all(s0[k] == 1), f"{k} never moved"
    assert not torch.equal(s0["layers.0.self_attn.q_proj.weight"], s1["layers.0.self_attn.q_proj.weight"])
    # the logged param_norm counts each logical weight once: replicated norm weights once, both ranks' shards
    sq = sum(s0[k].double().pow(2).sum() + (0 if k in norms else s1[k].double().pow(2).sum()) for k in s0)
    assert abs(history(out)[-1]["param_norm"] - sq.sqrt().item()) <= 1e-5 * sq.sqrt().item()
    assert history(out)[-1]["loss"] < history(out)[0]["loss"]
