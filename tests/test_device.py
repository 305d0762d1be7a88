"""The CUDA path (run by scripts/gpu_check.sh on a GPU): the ops, stochastic rounding, the widened and native
bf16 matmuls and a few train.py steps on the device, against float64 references computed on the CPU.

Device: CUDA when available; ``LLAMA_TEST_DEVICE=cpu`` runs the same tests on the CPU (gpu_check.sh --dry-run);
neither: skipped (these tests exist for a device; the CPU path is covered by the rest of the suite)."""
import os
import subprocess
import sys

import pytest
import torch

from kernels import ops
from training.precision import WidenedBf16Matmuls, stochastic_round_bf16

DEVICE = os.environ.get("LLAMA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (LLAMA_TEST_DEVICE=cpu runs these on CPU)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def grads_on(fn, inputs, dtype):
    """(outputs, input grads) of fn on DEVICE in dtype, and the same in float64 on the CPU."""
    out = []
    for dev, dt in ((DEVICE, dtype), ("cpu", torch.float64)):
        xs = [x.detach().to(device=dev, dtype=dt).clone().requires_grad_(True) for x in inputs]
        y = fn(*xs)
        y = y if isinstance(y, tuple) else (y,)
        sum((t.double() * (i + 1)).sum() for i, t in enumerate(y)).backward()
        out.append(([t.detach().double().cpu() for t in y], [x.grad.double().cpu() for x in xs]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope", "attention"])
def test_ops_forward_backward_on_device(op, dtype):
    b, h, s, d = 2, 4, 64, 32
    cos, sin = rand(s, d, seed=9).cos(), rand(s, d, seed=9).sin()
    fns = {"rms_norm": (lambda x, w: ops.rms_norm(x, w), [rand(b, s, 64), rand(64, seed=1)]),
           "swiglu": (ops.swiglu, [rand(b, s, 96), rand(b, s, 96, seed=1)]),
           "rope": (lambda q, k: ops.apply_rope(q, k, cos.to(q), sin.to(q)), [rand(b, h, s, d), rand(b, 2, s, d, seed=1)]),
           "attention": (ops.flash_attention, [rand(b, h, s, d), rand(b, 2, s, d, seed=1), rand(b, 2, s, d, seed=2)])}
    fn, inputs = fns[op]
    (y, g), (y64, g64) = grads_on(fn, inputs, dtype)
    for got, ref in zip(y + g, y64 + g64):
        err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= TOL[dtype], (op, dtype, err)


def test_stochastic_rounding_on_device_is_unbiased_between_neighbours():
    x = torch.full((1 << 20,), 1.0 + 2 ** -9, device=DEVICE)      # a quarter of the way from 1 to 1 + 2^-7
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    r = stochastic_round_bf16(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    frac_up = (r > 1).float().mean().item()
    assert abs(frac_up - 0.25) < 0.005                            # 1M draws: sd 0.0004


def test_widened_bf16_matmul_on_device_is_fp32_compute():
    a, w = rand(128, 256).bfloat16().to(DEVICE), rand(64, 256, seed=1).bfloat16().to(DEVICE)
    with WidenedBf16Matmuls():
        y = torch.nn.functional.linear(a, w)
    assert y.dtype == torch.bfloat16
    with torch.autocast(DEVICE, enabled=False):
        ref = torch.nn.functional.linear(a.float(), w.float()).bfloat16()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("precision", ["bf16-sr", "mixed"])
def test_train_steps_on_device(tmp_path, precision):
    out = str(tmp_path / precision)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--device", DEVICE, "--precision", precision,
                        "--max-steps", "4", "--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
                        "--out-dir", out, "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    import json
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(recs) == 4 and all(r["loss"] is not None and 0 < r["mfu"] <= 1 for r in recs)
