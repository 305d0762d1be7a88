"""The kernel report (python -m bench_kernels) and the estimate command (python -m bench_kernels.estimate) on small
shapes: files, columns, figures checked against independent counts, and one-line errors for bad input."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench_kernels import __main__ as report_cli
from bench_kernels import charts, estimate
from bench_kernels.kernel_report import CSV_COLUMNS, MODELS, rank_shapes, select

HBM_BW = 410e9          # B/s, trn1 per NeuronCore (kernels/sim/cost_constants.py, [ARCH])
PEAK = 128 * 128 * 2 * 2.8e9


def _rows(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_report_cli_small_shape_writes_csv_and_chart(tmp_path, capsys):
    env_before = os.environ.get("LLAMA_KERNELS_NKI")
    rc = report_cli.main(["--kernel", "rmsnorm,swiglu", "--shape", "7b", "--seq", "128", "--out", str(tmp_path),
                          "--no-progress"])
    assert rc == 0
    assert os.environ.get("LLAMA_KERNELS_NKI") == env_before          # the backend choice does not leak
    out = capsys.readouterr().out
    assert "est us" in out and "% roof" in out and "bound" in out
    cols, rows = _rows(tmp_path / "kernels.csv")
    assert tuple(cols) == CSV_COLUMNS
    assert [(r["kernel"], r["direction"]) for r in rows] == [("rmsnorm", "fwd"), ("rmsnorm", "bwd"),
                                                             ("swiglu", "fwd"), ("swiglu", "bwd")]
    s = rank_shapes("7b", 128)
    assert (s["hidden"], s["ffn"]) == (4096, 11008 // 8)
    # Minimum bytes counted here from the launcher signatures (bf16 = 2 B, rstd fp32 = 4 B per row).
    n, h, f = 128, s["hidden"], s["ffn"]
    expect_min = {("rmsnorm", "fwd"): 2 * n * h + 2 * h + 2 * n * h + 4 * n,
                  ("rmsnorm", "bwd"): 2 * n * h * 2 + 2 * h + 4 * n + 2 * n * h + 2 * h,
                  ("swiglu", "fwd"): 3 * 2 * n * f, ("swiglu", "bwd"): 5 * 2 * n * f}
    for r in rows:
        key = (r["kernel"], r["direction"])
        assert int(r["min_bytes"]) == expect_min[key]
        assert int(r["useful_flops"]) == 0
        est, floor = float(r["est_us"]), float(r["floor_us"])
        assert floor == pytest.approx(expect_min[key] / HBM_BW * 1e6, rel=1e-3)
        assert 0 < floor <= est
        assert float(r["pct_roofline"]) == pytest.approx(100 * floor / est, abs=0.02)
        for e in ("tensor", "vector", "scalar", "gpsimd", "dma"):
            assert 0.0 <= float(r[f"busy_{e}_pct"]) <= 100.0
        assert r["bound"] in ("tensor", "vector", "scalar", "gpsimd", "dma", "latency")
        assert float(r["hbm_ratio"]) >= 1.0
        assert r["measured_us"] == ""
        assert float(r["target_pct"]) == 75.0                # issue 11: elementwise kernels, 75% of HBM roofline
    import matplotlib.pyplot as plt
    img = plt.imread(tmp_path / "roofline.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    md = (tmp_path / "kernels.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[2].startswith("| rmsnorm | fwd | 7b | ")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]         # no temporary files left


def test_baseline_csv_gives_before_and_speedup(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    argv = ["--kernel", "swiglu", "--direction", "fwd", "--shape", "7b", "--seq", "128", "--no-progress"]
    assert report_cli.main([*argv, "--out", str(first)]) == 0
    assert report_cli.main([*argv, "--out", str(second), "--baseline", str(first / "kernels.csv")]) == 0
    out = capsys.readouterr().out
    (a,), (b,) = _rows(first / "kernels.csv")[1], _rows(second / "kernels.csv")[1]
    assert a["baseline_us"] == "" and float(b["baseline_us"]) == float(a["est_us"])
    assert "before us" in out and "1.00x" in out          # the model is deterministic: the same kernel, 1.00x
    # a baseline at another sequence length is another shape: not compared
    assert report_cli.main([*argv[:-3], "--seq", "256", "--no-progress", "--out", str(second), "--baseline",
                            str(first / "kernels.csv")]) == 0
    (c,) = _rows(second / "kernels.csv")[1]
    assert c["baseline_us"] == ""


def test_attention_useful_flops_count_only_unmasked_pairs():
    from bench_kernels.kernel_report import direction_spec
    s = rank_shapes("70b", 300)
    pairs = int(np.tril(np.ones((300, 300))).sum())          # causal: key <= query
    assert (s["q_heads"], s["kv_heads"]) == (8, 1)
    fwd = direction_spec("attention", "fwd").useful_flops(s)
    bwd = direction_spec("attention", "bwd").useful_flops(s)
    assert fwd == 2 * (2 * 128) * pairs * 8                  # QK^T and PV
    assert bwd == 5 * (2 * 128) * pairs * 8                  # QK^T recomputed, dP, dV, dK, dQ


def test_trace_writes_gantt_and_valid_chrome_trace(tmp_path, capsys):
    rc = report_cli.main(["--kernel", "attention", "--direction", "fwd", "--shape", "13b", "--seq", "128",
                          "--out", str(tmp_path), "--trace", "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    _, rows = _rows(tmp_path / "kernels.csv")
    (row,) = rows
    assert row["shape"].startswith("q,kv[1,5/5,128,128]")
    with open(tmp_path / "trace_attention_fwd_13b.json") as f:
        tr = json.load(f)
    ev = tr["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in ev if e["ph"] == "X"]
    assert spans and {e["ph"] for e in ev} <= {"M", "X"}
    for e in spans:
        assert isinstance(e["name"], str) and e["pid"] == 0 and e["tid"] in names
        assert e["ts"] >= 0 and e["dur"] >= 0
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(float(row["est_us"]), rel=1e-3)
    compute = [e for e in spans if not names[e["tid"]].startswith("dma")]
    n_compute = sum(int(row[f"n_{e}"]) for e in ("tensor", "vector", "scalar", "gpsimd", "sync"))
    assert len(compute) == n_compute                          # one span per compute instruction
    dma = {e["args"]["index"] for e in spans if names[e["tid"]].startswith("dma")}
    assert len(dma) == int(row["n_dma"])                      # every transfer on at least one DMA queue
    kinds = {e["name"] for e in spans if names[e["tid"]].startswith("dma")}
    assert {"dma_copy load", "dma_copy store"} <= kinds      # q, k, v loaded; o, lse stored
    import matplotlib.pyplot as plt
    assert plt.imread(tmp_path / "trace_attention_fwd_13b.png").shape[0] > 200


@pytest.mark.parametrize("argv, needles", [
    (["--kernel", "softmax"], ["unknown kernel 'softmax'", "rmsnorm"]),
    (["--shape", "7B"], ["unknown shape '7B'", "7b"]),
    (["--direction", "both"], ["unknown direction 'both'"]),
    (["--trace"], ["--trace writes one kernel's timeline", "24 are selected"]),
    (["--kernel", "rope", "--direction", "fwd", "--shape", "7b", "--trace", "--trace-window", "9"],
     ["--trace-window '9'"]),
    (["--kernel", "rope", "--shape", "7b", "--seq", "128", "--measure"], ["--measure: no Neuron device"]),
    (["--baseline", "/nonexistent/kernels.csv"], ["--baseline /nonexistent/kernels.csv", "No such file"]),
])
def test_report_cli_bad_input_one_line(argv, needles, capsys, tmp_path):
    rc = report_cli.main([*argv, "--out", str(tmp_path), "--no-progress"])
    _one_line_error(capsys, rc, *needles)
    assert not os.listdir(tmp_path)


def test_select_order_and_models():
    assert set(MODELS) == {"7b", "13b", "70b"}
    assert select(["rope"], ["70b", "7b"], ["bwd"]) == [("rope", "bwd", "70b"), ("rope", "bwd", "7b")]
    assert len(select()) == 4 * 2 * 3


_KERNEL_FILE = '''
from kernels.sim import nki, nl, nisa


@nki.jit
def scale_add(a, b, scale):
    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
    for i in range(a.shape[0] // 128):
        x = nl.ndarray((128, a.shape[1]), dtype=a.dtype, buffer=nl.sbuf)
        y = nl.ndarray((128, a.shape[1]), dtype=a.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x, src=a[i * 128:(i + 1) * 128, :])
        nisa.dma_copy(dst=y, src=b[i * 128:(i + 1) * 128, :])
        nisa.scalar_tensor_tensor(dst=x, data=x, op0=nl.multiply, operand0=scale, op1=nl.add, operand1=y)
        nisa.dma_copy(dst=out[i * 128:(i + 1) * 128, :], src=x)
    return out
'''


@pytest.fixture
def kernel_file(tmp_path):
    p = tmp_path / "scale_add.py"
    p.write_text(_KERNEL_FILE)
    return str(p)


def test_estimate_cli_small_kernel(kernel_file, tmp_path, capsys):
    prefix = str(tmp_path / "tl")
    rc = estimate.main([f"{kernel_file}:scale_add", "--shapes", "a=256x512:bfloat16", "b=256x512:bfloat16",
                        "--arg", "scale=0.5", "--trace", prefix])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "estimated" in out and "bound:" in out and "roofline floor" in out
    nbytes = 256 * 512 * 2
    assert f"read {2 * nbytes:,} B, written {nbytes:,} B" in out          # a and b read once, out written once
    assert f"(inputs + outputs) {3 * nbytes:,} B" in out
    with open(prefix + ".json") as f:
        assert json.load(f)["traceEvents"]
    assert os.path.getsize(prefix + ".png") > 1000


def test_estimate_json_spec_equals_compact_spec(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"a": {"shape": [256, 64], "dtype": "bfloat16"}, "b": [[256, 64], "bfloat16"],
                                "scale": 2.0}))
    t1, s1 = estimate.parse_spec([str(spec)], None)
    t2, s2 = estimate.parse_spec(["a=256x64:bfloat16", "b=256x64:bfloat16"], ["scale=2.0"])
    assert (t1, s1) == (t2, s2)
    x = estimate.random_inputs(t1, seed=3)
    assert x["a"].shape == (256, 64) and x["a"].dtype.name == "bfloat16" and np.isfinite(x["a"]).all()


@pytest.mark.parametrize("argv, needles", [
    (["{f}:scale_add", "--shapes", "a=256xK:bfloat16"], ["a=256xK:bfloat16", "positive integers"]),
    (["{f}:scale_add", "--shapes", "a=256x4:bf15"], ["unknown dtype 'bf15'"]),
    (["{f}:scale_add", "--shapes", "256x4"], ["expected NAME=D0xD1"]),
    (["{f}:scale_add", "--shapes", '{"a": [1,'], ["invalid JSON"]),
    (["{f}:scale_add", "--shapes", "a=128x4", "b=128x4"], ["missing inputs for parameter(s) scale"]),
    (["{f}:scale_add", "--shapes", "a=128x4", "c=128x4", "--arg", "scale=1"], ["no parameter 'c'"]),
    (["{f}:scale_add", "--shapes", "a=128x4", "b=128x4", "--arg", "scale=x y"], ["not a Python literal"]),
    (["{f}:nothere", "--shapes", "a=128x4"], ["no function 'nothere'", "scale_add"]),
    (["{f}", "--shapes", "a=128x4"], ["expected path/to/kernel.py:function"]),
    (["{d}/missing.py:f", "--shapes", "a=128x4"], ["missing.py: no such file"]),
])
def test_estimate_bad_input_one_line(argv, needles, kernel_file, tmp_path, capsys):
    argv = [a.replace("{f}", kernel_file).replace("{d}", str(tmp_path)) for a in argv]
    _one_line_error(capsys, estimate.main(argv), *needles)


def test_estimate_kernel_error_is_reported(kernel_file, capsys):
    rc = estimate.main([f"{kernel_file}:scale_add", "--shapes", "a=256x64", "b=128x64", "--arg", "scale=1.0"])
    err = capsys.readouterr().err
    assert rc == 1 and "scale_add raised" in err and "'b'" in err


def test_estimate_runs_official_import_nki_file(tmp_path):
    """A file written for the official package (`import nki`) runs unmodified in a fresh process."""
    p = tmp_path / "official.py"
    p.write_text(_KERNEL_FILE.replace("from kernels.sim import nki, nl, nisa",
                                      "import nki\nimport nki.language as nl\nimport nki.isa as nisa"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "bench_kernels.estimate", f"{p}:scale_add", "--shapes",
                        "a=128x256:float32", "b=128x256:float32", "--arg", "scale=3"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"read {2 * 128 * 256 * 4:,} B" in r.stdout


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.csv"
    with pytest.raises(RuntimeError):
        with charts.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert not os.listdir(tmp_path)
    charts.write_csv(str(target), [{"a": 1}], ["a"])
    assert target.read_text().split() == ["a", "1"]
