"""bf16-sr matmul compute (training.precision.matmul_plan / WidenedBf16Matmuls) and the MFU peak (training.metrics).

Widened matmuls are checked against float64 and against an explicit fp32 computation of the same bf16 operands;
the plan's decision against forced settings, faked CPU flags and faked measurements; MFU against its bound."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from training import metrics, precision
from training.precision import MatmulPlan, WidenedBf16Matmuls, matmul_plan


def bf16(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def test_widened_linear_is_fp32_compute_rounded_once():
    x, w = bf16((64, 96), 0).requires_grad_(True), bf16((48, 96), 1).requires_grad_(True)
    with WidenedBf16Matmuls():
        y = F.linear(x, w)
    assert y.dtype == torch.bfloat16
    # fp32 accumulation of exact bf16 products, one rounding: bitwise what an explicit fp32 GEMM gives
    assert torch.equal(y, F.linear(x.detach().float(), w.detach().float()).bfloat16())
    # and within half a bf16 ulp (plus fp32 summation error) of the float64 product
    ref = F.linear(x.detach().double(), w.detach().double())
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=2 ** -10)
    assert ((y.double() - ref).abs() <= ulp).all()
    g = bf16((64, 48), 2)
    y.backward(g)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, (g.float() @ w.detach().float()).bfloat16())
    assert torch.equal(w.grad, (g.float().t() @ x.detach().float()).bfloat16())


@pytest.mark.parametrize("op", ["matmul", "@", "mm", "bmm", "addmm", "out"])
def test_every_matmul_form_is_widened(op):
    a, b = bf16((4, 8, 16), 3), bf16((4, 16, 8), 4)
    with WidenedBf16Matmuls():
        if op == "matmul":
            got, want = torch.matmul(a, b), torch.matmul(a.float(), b.float())
        elif op == "@":
            got, want = a[0] @ b[0], a[0].float() @ b[0].float()
        elif op == "mm":
            got, want = a[0].mm(b[0]), a[0].float().mm(b[0].float())
        elif op == "bmm":
            got, want = torch.bmm(a, b), torch.bmm(a.float(), b.float())
        elif op == "addmm":
            c = bf16((8, 8), 5)
            got, want = torch.addmm(c, a[0], b[0]), torch.addmm(c.float(), a[0].float(), b[0].float())
        else:
            got = torch.empty(8, 8, dtype=torch.bfloat16)
            torch.mm(a[0], b[0], out=got)
            want = a[0].float() @ b[0].float()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


def test_fp32_matmuls_are_untouched():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with WidenedBf16Matmuls():
        assert torch.equal(a @ b, torch.mm(a, b))


def test_plan_forced_and_decided(monkeypatch):
    env = precision.MATMUL_ENV
    assert matmul_plan("bf16-sr", "cpu", {env: "fp32"}) == MatmulPlan("fp32", f"{env}=fp32")
    assert matmul_plan("bf16-sr", "cpu", {env: "native"}).compute == "bf16"
    assert matmul_plan("fp32", "cpu", {}).compute == "fp32"
    assert matmul_plan("mixed", "cpu", {}).compute == "bf16"
    assert matmul_plan("bf16-sr", "cuda", {}).compute == "bf16"
    with pytest.raises(ValueError, match=f"{env}='fast': expected auto, native or fp32"):
        matmul_plan("bf16-sr", "cpu", {env: "fast"})
    # no bf16 feature advertised (an AVX2 CPU): widened without measuring
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: set())
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, **k: pytest.fail("measured"))
    plan = matmul_plan("bf16-sr", "cpu", {})
    assert plan.compute == "fp32" and "advertises no bf16" in plan.reason
    # advertised: the measurement decides, and the reason carries its figures
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: {"avx512_bf16"})
    for bf, fp, want in ((34.0, 250.0, "fp32"), (270.0, 250.0, "fp32"), (900.0, 250.0, "bf16")):
        monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, bf=bf, fp=fp, **k: bf if dtype == torch.bfloat16
                            else fp)
        plan = matmul_plan("bf16-sr", "cpu", {})
        assert plan.compute == want and f"bf16 {bf:.0f} vs fp32 {fp:.0f}" in plan.reason



def test_a_bf16_gemm_far_slower_stops_measuring(monkeypatch):
    """A bf16 GEMM CLEAR_LOSS x slower than fp32 decides after one interleaved pair (no ~2 s of slow trials at
    start-up); a close race keeps all 7 pairs."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: {"amx_bf16"})
    for bf, fp, pairs in ((2.0, 190.0, 1), (250.0, 250.0, 7), (190.0 / precision.CLEAR_LOSS * 1.01, 190.0, 7)):
        calls = []
        monkeypatch.setattr(precision, "matmul_gflops",
                            lambda dtype, bf=bf, fp=fp, **k: calls.append(dtype) or (bf if dtype == torch.bfloat16
                                                                                      else fp))
        assert matmul_plan("bf16-sr", "cpu", {}).compute == "fp32"
        assert calls.count(torch.bfloat16) == calls.count(torch.float32) == pairs

def test_cpu_flags_parsed(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu avx2\n")
    assert precision.cpu_bf16_flags(str(f)) == {"avx512_bf16"}
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert precision.cpu_bf16_flags(str(f)) == set()
    f.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")            # aarch64
    assert precision.cpu_bf16_flags(str(f)) == {"bf16"}
    assert precision.cpu_bf16_flags(str(tmp_path / "missing")) == set()


@settings(max_examples=200)
@given(peak=st.floats(1e-6, 1e6), rates=st.lists(st.floats(0, 1e9, allow_nan=False), min_size=1, max_size=20))
def test_mfu_is_at_most_one_by_construction(peak, rates):
    p = metrics.Peak(peak, "test")
    for r in rates:
        m = p.mfu(r)
        assert 0 <= m <= 1
        assert p.tflops >= r
    assert p.raised == (max(rates) > peak)
    assert ("raised to the best achieved rate" in p.source) == p.raised


def test_cpu_peak_probe_covers_the_f_linear_layout(monkeypatch):
    """The MFU peak is the faster of ``a @ b`` and F.linear's ``a @ b.t()``: an AVX2-only CPU's bf16 fallback runs
    the second several times faster, and a peak probed in the first only was below the model's own rate."""
    seen = []

    def fake(dtype, layout="nn", **k):
        seen.append(layout)
        return {"nn": 9.0, "nt": 50.0}[layout]
    monkeypatch.setattr(precision, "matmul_gflops", fake)
    assert metrics.measure_cpu_tflops(torch.bfloat16) == pytest.approx(0.05)
    assert sorted(seen) == ["nn", "nt"]
    monkeypatch.undo()
    for layout in ("nn", "nt"):                                  # both layouts really run (small, one trial)
        g = precision.matmul_gflops(torch.float32, n=64, trials=1, min_time=0.0, layout=layout)
        assert math.isfinite(g) and g > 0
    with pytest.raises(ValueError, match="layout must be 'nn' or 'nt'"):
        precision.matmul_gflops(torch.float32, n=8, layout="tn")


def test_mfu_rejects_bad_peaks_and_rates():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="peak TFLOPS must be a finite number > 0"):
            metrics.Peak(bad, "x")
    assert math.isnan(metrics.Peak(1.0, "x").mfu(float("nan")))


def test_gpu_peak_follows_the_matmul_dtype():
    assert metrics.gpu_peak_tflops("NVIDIA H200", torch.bfloat16, False)[0] == 989.0
    assert metrics.gpu_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16, False)[0] == 756.0
    assert metrics.gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32, False)[0] == 67.0
    assert metrics.gpu_peak_tflops("NVIDIA A100-SXM4-40GB", torch.float32, True)[0] == 156.0
    with pytest.raises(ValueError, match="pass --peak-tflops"):
        metrics.gpu_peak_tflops("Some GPU", torch.bfloat16, False)


def test_cpu_peak_is_measured_in_the_given_dtype():
    v, src = metrics.peak_tflops("cpu", torch.float32)
    assert v > 0 and "float32" in src and "estimate" in src


def test_train_bf16_sr_both_matmul_paths_and_mfu_bound(tmp_path):
    """The default precision trains with either matmul compute, forced by the environment, says which in its
    first lines, and their losses agree to bf16 precision (same weights, data and SR bits; only GEMMs differ).
    A peak far below the achieved rate (--peak-tflops 1e-9) cannot print an MFU above 100%: before issue 15 this
    run printed MFU ~1e7 %."""
    from test_train import SMALL, metrics, train
    losses = {}
    for mode in ("fp32", "native"):
        out = str(tmp_path / mode)
        p = train("--max-steps", 3, "--out-dir", out, *SMALL, env={precision.MATMUL_ENV: mode})
        assert f"matmuls in {'fp32' if mode == 'fp32' else 'bf16'} ({precision.MATMUL_ENV}={mode})" in p.stdout
        losses[mode] = [r["loss"] for r in metrics(out)]
    assert losses["fp32"] == pytest.approx(losses["native"], rel=2e-2)
    out = str(tmp_path / "peak")
    p = train("--max-steps", 2, "--out-dir", out, "--peak-tflops", "1e-9", "--precision", "fp32", *SMALL)
    assert all(r["mfu"] <= 1.0 for r in metrics(out))
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("MFU"))
    assert "100.00%" in line and "raised to the best achieved rate" in line, line


@pytest.mark.parametrize("chunk_elems", [1 << 23, 300])            # one chunk, several (uneven last one)
def test_fused_loss_under_widened_matmuls_is_the_widened_unfused_loss(chunk_elems):
    """Under WidenedBf16Matmuls the fused LM-head loss (which writes its fp32 GEMMs in place, issue 15) gives what
    the unfused widened computation gives, written out here in fp32: logits = bf16(fp32 GEMM of the bf16
    operands) upcast, softmax gradient in fp32, dHidden = bf16(bf16(grad) @ W) and dWeight = bf16(grad^T @ h)."""
    from llama.loss import LinearCrossEntropy
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 9, 32, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(60, 32, generator=g) * 0.3).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 60, (2, 9), generator=g)
    labels[0, 4:6] = -100
    with WidenedBf16Matmuls():
        loss = LinearCrossEntropy(chunk_elems)(h, w, labels, "sum")
    dh, dw = torch.autograd.grad(loss, (h, w))
    h32, w32, flat = h.detach().float().view(-1, 32), w.detach().float(), labels.view(-1)
    logits = (h32 @ w32.t()).bfloat16().float()
    valid = flat != -100
    ref = F.cross_entropy(logits, flat, ignore_index=-100, reduction="sum")
    grad = torch.softmax(logits, -1) - F.one_hot(flat.clamp(min=0), 60).float()
    grad[~valid] = 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert dh.dtype == dw.dtype == torch.bfloat16
    want_dh = (grad.bfloat16().float() @ w32).bfloat16().view_as(dh)
    want_dw = (grad.t() @ h32).bfloat16()
    # fp32 sums in another order may move a value across a bf16 rounding boundary: at most one bf16 ulp
    ulp = torch.finfo(torch.bfloat16).eps
    assert ((dh.float() - want_dh.float()).abs() <= ulp * want_dh.float().abs() + 1e-30).all()
    assert ((dw.float() - want_dw.float()).abs() <= ulp * want_dw.float().abs() + 1e-30).all()
    assert dh[0, 4:6].abs().max() == 0
    # and the path taken is the in-place one: every GEMM gets fp32 operands (none is left for the mode to widen
    # through bf16 copies of [rows, V] buffers)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in precision._MATMULS:
                seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))
    with WidenedBf16Matmuls(), Spy():
        LinearCrossEntropy(chunk_elems)(h, w, labels, "sum")
    assert seen and all(d == torch.float32 for dtypes in seen for d in dtypes), seen
