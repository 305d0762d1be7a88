"""The native extension's loader (kernels/native/__init__.py): build once into an empty cache under a lock, and the
PyTorch fallback with a one-time notice naming the cause when it cannot build. Each case runs in a fresh process
with its own cache directory (``$LLAMA_TRN_NATIVE_CACHE``)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps on the PyTorch path: kernels.ops (reference backend) and SRAdamW, with the native mode "auto".
_FALLBACK = """
import torch, kernels.native as native
from kernels import ops
from training.optim import SRAdamW
native.set_mode("auto")
x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
(ops.rms_norm(x, w) * ops.swiglu(x, x)).sum().backward()
p = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16)); p.grad = torch.randn(10).to(torch.bfloat16)
SRAdamW([p], lr=1e-2, seed=1).step()
print("enabled", native.enabled(), "available", native.available())
try:
    native.set_mode("on")
except RuntimeError as e:
    print("on-error", e)
"""


def _run(code, cache, **env):
    full = dict(os.environ, LLAMA_TRN_NATIVE_CACHE=str(cache), **env)
    full.pop("LLAMA_NATIVE", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_without_a_compiler_everything_runs_on_pytorch_with_one_notice(tmp_path):
    p = _run(_FALLBACK, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert p.returncode == 0, p.stderr
    assert "enabled False available False" in p.stdout
    notices = [ln for ln in p.stderr.splitlines() if "native CPU kernels unavailable" in ln]
    assert len(notices) == 1 and "no C++ compiler" in notices[0], p.stderr
    assert "on-error" in p.stdout and "no C++ compiler" in p.stdout       # --native on: an error with the cause
    assert not list(tmp_path.glob("*/libllama_native.so"))


def test_a_failed_build_falls_back_and_names_the_failing_step(tmp_path):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'bad-cxx 1.0'\nexit 1\n")            # "compiles" nothing
    bad.chmod(0o755)
    p = _run(_FALLBACK, tmp_path / "cache", CXX=str(bad))
    assert p.returncode == 0, p.stderr
    assert "enabled False available False" in p.stdout
    notices = [ln for ln in p.stderr.splitlines() if "native CPU kernels unavailable" in ln]
    assert len(notices) == 1 and "cmake failed" in notices[0], p.stderr
    assert not list((tmp_path / "cache").glob("*/libllama_native.so"))     # nothing half-built is left to load
    assert not list((tmp_path / "cache").glob("*/.build-*"))


def test_two_processes_build_once_into_an_empty_cache(tmp_path):
    code = "import kernels.native as n; import sys; ok = n.available(); print('ok', ok, n.info()['isa']); " \
           "sys.exit(0 if ok else 1)"
    env = dict(os.environ, LLAMA_TRN_NATIVE_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("ok True")
    builds = sum("building the native CPU extension" in err for _out, err in outs)
    assert builds == 1, [err for _o, err in outs]                          # the lock made the other one wait
    libs = list(tmp_path.glob("*/libllama_native.so"))
    assert len(libs) == 1
    leftovers = [q.name for q in libs[0].parent.iterdir() if q.name.startswith(".")]
    assert not leftovers, leftovers                                         # temporaries renamed or removed
