"""``python train.py`` with the native CPU kernels (the default, --native auto) and without (--native off): the
summary says which path ran, the first step's loss is bit for bit the same (the native forward kernels equal the
reference), the runs stay together, and --native on without a possible build is a clear error."""
import json
import os

from tests.test_train import SMALL, train


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


def test_default_run_uses_native_and_matches_native_off(tmp_path):
    runs = {}
    for mode in ("auto", "off"):
        out = str(tmp_path / mode)
        p = train("--max-steps", 4, "--out-dir", out, "--native", mode, *SMALL)
        summary = p.stdout[p.stdout.index("train.py summary"):]
        runs[mode] = (summary, _losses(out))
    assert "native kernels  on (" in runs["auto"][0] and "fused AdamW-SR, RMSNorm, SwiGLU" in runs["auto"][0]
    assert "native kernels  off (--native off)" in runs["off"][0]
    native, torch_path = runs["auto"][1], runs["off"][1]
    assert native[0] == torch_path[0]                                       # step 1: the forward, bit for bit
    assert all(abs(a - b) < 1e-2 for a, b in zip(native, torch_path)), (native, torch_path)


def test_native_on_without_a_compiler_is_a_clear_error(tmp_path):
    p = train("--max-steps", 1, "--out-dir", str(tmp_path / "run"), "--native", "on", *SMALL, check=False,
              env=dict(LLAMA_TRN_NATIVE_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "none")))
    assert p.returncode == 2, p.stderr
    assert "--native on" in p.stderr and "no C++ compiler" in p.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_without_a_compiler_the_default_run_falls_back_and_says_why(tmp_path):
    out = str(tmp_path / "run")
    p = train("--max-steps", 2, "--out-dir", out, *SMALL,
              env=dict(LLAMA_TRN_NATIVE_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "none")))
    assert "native kernels  off (unavailable: no C++ compiler" in p.stdout
    assert p.stderr.count("native CPU kernels unavailable") == 1                 # the one-time notice
    assert len(_losses(out)) == 2
