"""Shared pieces of the interpreter tests (tests/test_sim_*.py): dtypes, input makers, numpy references.

The tests check ``kernels.sim`` against the NKI documentation (new ``nki`` namespace, NKI >= 0.3, trn1 =
NeuronCore-v2), never against the interpreter's own code: every expected value is computed here with numpy
(float64 where the engine computes in fp32, then rounded with ml_dtypes where the engine writes bf16).

Numerics as documented (spec sections 2.4, 2.5, 2.9, 4.1): Vector/Scalar/GpSimd arithmetic in fp32 with one
round-to-nearest-even cast to ``dst.dtype`` per write; matmul accumulation in fp32 PSUM.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from kernels.sim import nki, nl, nisa, ConstraintError, CapacityError  # noqa: F401  (re-exported for tests)

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)

# numpy dtype -> the nl dtype a kernel names.
NL_DTYPE = {F32: nl.float32, BF16: nl.bfloat16, I32: nl.int32}
FLOAT_DTYPES = (F32, BF16)

PMAX = 128


def nl_dt(np_dtype):
    return NL_DTYPE[np.dtype(np_dtype)]


def rand(shape, dtype=F32, seed=0, lo=-2.0, hi=2.0):
    """Uniform values in [lo, hi), rounded to dtype (so the kernel and the reference see the same inputs)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, size=shape).astype(np.float32).astype(dtype)


def randn(shape, dtype=F32, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def cast(x64, dtype):
    """The engine's write: fp32 result, then one RNE cast to dst dtype (fp32 -> bf16 via ml_dtypes)."""
    return np.asarray(x64, dtype=np.float64).astype(np.float32).astype(dtype)


def f64(x):
    return np.asarray(x).astype(np.float64)


def ulp_tol(dtype):
    """Relative tolerance of one rounding to dtype plus fp32 internal error."""
    return 2.0 ** -7 if np.dtype(dtype) == BF16 else 2.0 ** -20


def assert_close(out, ref64, dtype, rtol=None, atol=0.0, what=""):
    """out (dtype) vs a float64 reference: within one rounding of dtype (+ a few fp32 ulps) elementwise."""
    out = np.asarray(out)
    assert out.dtype == np.dtype(dtype), f"{what}: dtype {out.dtype} != {np.dtype(dtype)}"
    ref64 = np.asarray(ref64, dtype=np.float64)
    assert out.shape == ref64.shape, f"{what}: shape {out.shape} != {ref64.shape}"
    rtol = ulp_tol(dtype) if rtol is None else rtol
    o = out.astype(np.float64)
    err = np.abs(o - ref64)
    bound = rtol * np.abs(ref64) + atol
    bad = ~(err <= bound) & np.isfinite(ref64)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements off; worst err "
                           f"{err[bad].max():.3e} at ref {ref64[bad][np.argmax(err[bad])]:.6e}")


# ---- numpy references of the activation functions (spec 2.4; gelu = exact erf form, tanh form is gelu_apprx_tanh)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


ACT_REF = {
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "reciprocal": lambda x: 1.0 / x,
    "silu": lambda x: x * _sigmoid(x),
    "silu_dx": lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "square": np.square,
    "copy": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
}
# Ops needing a positive (or non-zero) input domain inside their documented valid range.
POSITIVE_OPS = {"log", "sqrt", "rsqrt", "reciprocal"}


# ---- hypothesis strategies (limits: P <= 128, tiles up to 128 x 512)
parts = st.integers(1, PMAX)
frees = st.integers(1, 512)
float_dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2 ** 16)


def hbm_out(shape, dtype):
    """A kernel output: NKI >= 0.3 requires outputs in shared_hbm."""
    return nl.ndarray(tuple(shape), dtype=dtype, buffer=nl.shared_hbm)


def load(src, dtype=None, shape=None):
    """HBM -> a fresh SBUF tile with dma_copy (the documented primary DMA)."""
    t = nl.ndarray(tuple(shape or src.shape), dtype=dtype or src.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    return t


def store(tile, dtype=None):
    """SBUF tile -> a fresh shared_hbm output of the same shape."""
    out = hbm_out(tile.shape, dtype or tile.dtype)
    nisa.dma_copy(dst=out, src=tile)
    return out


def run(kernel_fn, *args, **kwargs):
    """Decorate with nki.jit and run on numpy arrays (the interpreter returns numpy arrays)."""
    return nki.jit(kernel_fn)(*args, **kwargs)
