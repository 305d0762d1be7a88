"""Measured kernel time on a Neuron device (trn1), beside the cost model's estimate. UNTESTED HERE: our machines
have no Neuron device; this is real code for a Neuron host (Neuron SDK >= 2.29 with the ``nki`` package, torch-
neuronx / torch-xla), written from the documentation below and never run.

Why not ``nki.benchmark``: it belongs to the legacy ``neuronxcc.nki`` namespace; the new ``nki`` package (NKI
>= 0.3, SDK 2.27+) does not provide them ("nki.benchmark and nki.profile are not available with Beta 2", known
issues of https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/nki_rn.html ; absent from the NKI 0.6 API
pages). What the current docs give for kernels called from PyTorch is

* timing the framework call: each launcher call on XLA tensors becomes one graph with the kernel as a custom
  call; ``torch_xla.sync()`` (``xm.mark_step()`` before torch-xla 2.x) cuts and launches the graph and
  ``xm.wait_device_ops()`` blocks until the device is idle. That wall time per call includes the graph launch
  overhead, so it is an upper bound on the kernel's device time ("measured" in the report says so);
* a device profile for the exact kernel time per instruction: with ``NEURON_RT_INSPECT_ENABLE=1``,
  ``NEURON_RT_INSPECT_DEVICE_PROFILE=1`` and ``NEURON_RT_INSPECT_OUTPUT_DIR`` the runtime writes the NEFF and an
  NTFF trace of the first execution of each NEFF per NeuronCore; ``NEURON_FRAMEWORK_DEBUG=1`` keeps the kernel
  source lines; open them in Neuron Explorer (``neuron-explorer view``).
  Pages: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/neuron_profile_for_nki.html ,
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/tools/neuron-explorer/environment-variables.html ,
  https://awsdocs-neuron.readthedocs-hosted.com/en/v2.28.1/tools/neuron-explorer/how-to-profile-workload.html

The measurement runs in a child process (``python -m bench_kernels.device ...``) with LLAMA_KERNELS_NKI=nki, so
that its kernel modules bind the real ``nki`` while the parent keeps the interpreter for the estimate.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

PROFILE_ENV = {"NEURON_RT_INSPECT_ENABLE": "1", "NEURON_RT_INSPECT_DEVICE_PROFILE": "1",
               "NEURON_FRAMEWORK_DEBUG": "1"}


def available():
    """(True, "") on a Neuron host with the real nki and torch-xla; else (False, what is missing)."""
    from kernels.nki_compat import _real_nki_available
    if not _real_nki_available():
        return False, "the real 'nki' package is not installed (kernels.nki_compat would select the interpreter)"
    if importlib.util.find_spec("torch_xla") is None:
        return False, "torch_xla (torch-neuronx) is not installed"
    if not glob.glob("/dev/neuron*"):
        return False, "no /dev/neuron* device files (Neuron driver not loaded or no Neuron device)"
    return True, ""


def measure(kernel, direction, model, seq, warmup=5, iters=20, profile_dir=None, timeout_s=3600):
    """Median wall microseconds per launcher call on the device (see module docstring), from a child process."""
    env = dict(os.environ, LLAMA_KERNELS_NKI="nki")
    if profile_dir:
        env.update(PROFILE_ENV, NEURON_RT_INSPECT_OUTPUT_DIR=os.path.abspath(profile_dir))
    cmd = [sys.executable, "-m", "bench_kernels.device", kernel, direction, model, "--seq", str(seq),
           "--warmup", str(warmup), "--iters", str(iters)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"device measurement of {kernel} {direction} {model} failed: {tail[0]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["median_us"]


def _sync(xm):
    import torch_xla
    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:
        xm.mark_step()
    xm.wait_device_ops()


def _child(kernel, direction, model, seq, warmup, iters):
    import torch
    from kernels import nki_compat
    if nki_compat.BACKEND != "nki":
        raise SystemExit(f"bench_kernels.device: kernels.nki_compat.BACKEND is {nki_compat.BACKEND!r}, not 'nki'")
    import torch_xla.core.xla_model as xm
    from bench_kernels.kernel_report import launcher_inputs

    import torch_xla
    dev = torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()
    fn, args, _ = launcher_inputs(kernel, direction, model, seq)
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    _sync(xm)
    for _ in range(warmup):           # the first call compiles the graph (neuronx-cc) and loads the NEFF
        fn(*args)
        _sync(xm)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        _sync(xm)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6, "iters": iters,
                      "how": "wall per launcher call + torch_xla.sync + xm.wait_device_ops (incl. launch overhead)"}))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench_kernels.device", description=__doc__.splitlines()[0])
    ap.add_argument("kernel")
    ap.add_argument("direction")
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)
    ok, why = available()
    if not ok:
        print(f"python -m bench_kernels.device: error: no Neuron device to measure on ({why})", file=sys.stderr)
        return 2
    _child(a.kernel, a.direction, a.model, a.seq, a.warmup, a.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
