"""Precision modes and fp32 -> bf16 stochastic rounding (SR).

Modes (``--precision``):
    bf16-sr  parameters and gradients in bf16; the AdamW math in fp32 (``training.optim.SRAdamW``), parameters
             written back with stochastic rounding. On XLA devices the Neuron runtime rounds stochastically in
             hardware (``NEURON_RT_STOCHASTIC_ROUNDING_EN=1``, seed ``NEURON_RT_STOCHASTIC_ROUNDING_SEED``), so the
             write-back is a plain cast there. On CPU/GPU only the weight update is stochastically rounded
             (torchao/llm.c style); Trainium rounds every internal fp32->bf16 cast, so parity is statistical.
             Matmul compute (``matmul_plan``): native bf16 GEMMs where the device has bf16 matrix units (GPU,
             trn1, a CPU whose bf16 GEMM measures at least as fast as its fp32 one), else "widened": each matmul
             with a bf16 operand (``F.linear``, ``matmul``/``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``) runs
             on operands cast exactly to fp32, accumulates in fp32 and rounds its result once to bf16 (RNE); its
             backward is the same (fp32 GEMMs on the widened bf16 gradient, each gradient rounded once to bf16).
             That is a native bf16 GEMM's numerics (bf16 products are exact in fp32; oneDNN and trn1's TensorE
             accumulate in fp32) up to the order of the fp32 summation. Parameters, gradients and SR unchanged.
    mixed    fp32 parameters, gradients and optimizer ("master weights") with ``torch.autocast(bf16)``:
             the GPU reference of the seed.
    fp32     everything fp32.

SR definition (written from the definition, on the fp32 bit pattern): let b be the 32 bits of x and r a
uniform random integer in [0, 2^16). Then sr(x) = bf16 whose bits are the high 16 bits of (b + r). A value
between two bf16 neighbours lo < x < hi is rounded to hi with probability (x - lo) / (hi - lo) (its low 16
bits / 2^16), so E[sr(x)] = x: unbiased. For negative x the same holds in magnitude (the sign bit is above
the carry). The carry may run into the exponent: that is the correct next bf16 value, and for |x| above the
largest finite bf16 it yields +-inf with the matching probability (as round-to-nearest overflows). +-inf have
zero low bits and stay inf. NaN is special-cased (its low bits would otherwise truncate to inf).

Random bits, counter-based: element i of a tensor gets r(i) = 16 bits of a hash of (key, i >> 1) (``sr_bits``;
the definition is in kernels/native/counter_rng.h, which the native kernels implement bit for bit), with the key
``sr_tensor_key(seed, step, stream, index)`` a pure function of the run seed, the optimizer step, the SR stream
and the tensor's index in its parameter group. The bits do not depend on threads or on the order tensors are
processed, the SR state of a run is fully described by (seed, step), both in every checkpoint, and resume
reproduces the rounding bitwise. ``stochastic_round_bf16(x, generator)`` (``torch.randint`` bits) remains for
callers that hold a generator.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sr_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit generator seed from (run seed, optimizer step, stream); well mixed so nearby inputs differ."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ step) ^ stream) >> 1


# Stream ids. Replicated parameters (same value on every TP rank, e.g. RMSNorm weights) draw from the stream
# SHARED_STREAM, identical on every rank of the TP group, so their SR write-back is bit-identical across ranks
# (independent bits would make the copies drift apart: the NeMo "TP drift" bug). Sharded parameters draw from
# a per-TP-rank stream: shards are different tensors, and a shared stream would reuse the same random pattern
# at the same local offsets of every shard, correlating the rounding errors of one logical matrix. DP ranks
# hold identical gradients after the all-reduce and must round identically, so the DP rank is never part of it.
SHARED_STREAM = 0


def sharded_stream(tp_rank: int) -> int:
    return 1 + tp_rank


def sr_tensor_key(seed: int, step: int, stream: int, index: int) -> int:
    """The 63-bit SR key of one tensor: the ``index``-th tensor of a parameter group at optimizer ``step``."""
    return _splitmix64(sr_seed(seed, step, stream) ^ index) >> 1


def _s32(v: int) -> int:
    """A uint32 as the int32 with the same bits (torch's int32 arithmetic wraps like uint32's)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int32 right shifts are arithmetic: the masks make them logical, as on uint32
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _s32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _s32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def sr_bits(key: int, n: int, device=None) -> torch.Tensor:
    """r(i) for i in [0, n): int32 values in [0, 2^16). h(c) = mix32(mix32(c ^ k0) ^ k1) with k0 / k1 the low /
    high 32 bits of ``key``; element i takes the low (even i) or high (odd i) half of h(i >> 1)."""
    if n >= 1 << 33:
        raise ValueError(f"sr_bits: {n} elements; the SR counter allows fewer than 2^33")
    c = torch.arange((n + 1) // 2, dtype=torch.int64, device=device).to(torch.int32)   # counters < 2^32, wrapped
    h = _mix32(_mix32(c ^ _s32(key & 0xFFFFFFFF)) ^ _s32((key >> 32) & 0xFFFFFFFF))
    return torch.stack((h & 0xFFFF, (h >> 16) & 0xFFFF), dim=-1).reshape(-1)[:n]


_BF16_QNAN = 0x7FC0


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None, *,
                          key: int | None = None) -> torch.Tensor:
    """fp32 tensor -> bf16 tensor, stochastically rounded (see the module docstring). Same shape and device.

    The bits come from ``sr_bits(key, ...)`` over the row-major elements when ``key`` is given (the rule of
    SRAdamW and of the native kernels; NaN becomes the canonical quiet NaN), else from ``torch.randint``.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16: expected a float32 tensor, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    if key is not None:
        r = sr_bits(key, x.numel(), x.device).view(x.shape)
    else:
        r = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    # int32 addition is the uint32 addition of the bit patterns except where it wraps past 0xFFFFFFFF, which only
    # negative NaNs (0xFFFF0001..) can reach; NaNs are restored below.
    rounded = ((bits + r) & -65536).view(torch.float32).to(torch.bfloat16)   # low bits are zero: exact cast
    nan = x.to(torch.bfloat16) if key is None else torch.tensor(_BF16_QNAN, dtype=torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), nan.to(x.device), rounded)


def set_neuron_sr_env(seed: int) -> None:
    """Hardware SR on trn1: every fp32->bf16 cast on the NeuronCore rounds stochastically. Must be set before the
    Neuron runtime starts (i.e. before torch_xla is imported). Docs: Neuron "Rounding modes" and the runtime
    environment variables page (NEURON_RT_STOCHASTIC_ROUNDING_EN, NEURON_RT_STOCHASTIC_ROUNDING_SEED)."""
    os.environ["NEURON_RT_STOCHASTIC_ROUNDING_EN"] = "1"
    os.environ["NEURON_RT_STOCHASTIC_ROUNDING_SEED"] = str(seed & 0x7FFFFFFF)


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-sr" else torch.float32


def autocast_context(precision: str, device_type: str):
    """bf16 autocast for "mixed"; a no-op context otherwise."""
    if precision == "mixed":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device_type, enabled=False)


# ---------------------------------------------------------------------- bf16 matmul compute (bf16-sr)
MATMUL_ENV = "LLAMA_TRAIN_BF16_MATMUL"       # auto (default) | native | fp32: force the choice of matmul_plan
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 bf16 dot-product / tile units (/proc/cpuinfo)
NATIVE_MARGIN = 1.25                         # native bf16 GEMMs only when measured this much faster than fp32
CLEAR_LOSS = 8                               # bf16 GEMMs this much slower than fp32: no more trials


@dataclass(frozen=True)
class MatmulPlan:
    """How bf16 matmuls run: ``compute`` "bf16" (native) or "fp32" (widened, see the module docstring), and why."""
    compute: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.compute == "fp32" else torch.bfloat16


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The bf16 matrix features the CPU advertises: x86 ``avx512_bf16``/``amx_bf16``, aarch64 ``bf16``."""
    try:
        with open(cpuinfo) as fh:
            text = fh.read()
    except OSError:
        return set()
    words = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    return words & {*BF16_CPU_FLAGS, "bf16"}


def matmul_gflops(dtype: torch.dtype, n: int = 512, trials: int = 3, min_time: float = 0.02,
                  layout: str = "nn") -> float:
    """Best-of-``trials`` GFLOP/s of an n x n x n matmul on this process's threads, warmed up, each trial repeated
    until it lasts ``min_time`` seconds (so one slow call or timer granularity cannot decide it). ``layout``:
    "nn" is ``a @ b``; "nt" is ``a @ b.t()``, the layout of ``F.linear`` (x @ W^T), which CPU fallback kernels
    for bf16 run several times faster than "nn" (dot products over contiguous rows; see llama/loss.py)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    if layout == "nt":
        b = b.t()
    elif layout != "nn":
        raise ValueError(f"matmul_gflops: layout must be 'nn' or 'nt', got {layout!r}")
    t0 = time.perf_counter()
    a @ b                                          # warm-up: thread pool, kernel selection, page faults
    reps = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best / 1e9


def matmul_plan(precision: str, device_type: str, env=None) -> MatmulPlan:
    """The matmul compute of a run. Only bf16-sr on CPU has a choice: fp32 for fp32/mixed-free paths is "fp32",
    ``mixed`` is bf16 autocast by definition, GPUs and trn1 have bf16 matrix units. On CPU, forced by
    ``LLAMA_TRAIN_BF16_MATMUL=native|fp32``; else widened when the CPU advertises no bf16 matrix feature, and
    otherwise decided by measurement: native only if a bf16 512^3 GEMM is NATIVE_MARGIN x as fast as the fp32 one
    (best of 7 interleaved trials each; the decision is recorded in checkpoints and kept on resume)."""
    env = os.environ if env is None else env
    if precision == "fp32":
        return MatmulPlan("fp32", "fp32 parameters")
    if precision != "bf16-sr" or device_type != "cpu":
        return MatmulPlan("bf16", "bf16 autocast" if precision == "mixed" else f"bf16 matrix units ({device_type})")
    forced = env.get(MATMUL_ENV, "auto").strip().lower()
    if forced not in ("auto", "native", "fp32", ""):
        raise ValueError(f"{MATMUL_ENV}={forced!r}: expected auto, native or fp32")
    if forced == "native":
        return MatmulPlan("bf16", f"{MATMUL_ENV}=native")
    if forced == "fp32":
        return MatmulPlan("fp32", f"{MATMUL_ENV}=fp32")
    flags = cpu_bf16_flags()
    if not flags:
        return MatmulPlan("fp32", "this CPU advertises no bf16 matrix feature (" + "/".join(BF16_CPU_FLAGS) + ")")
    # interleaved, best of 7 each: load from other processes slows trials down, never up, and hits both dtypes.
    # Native only with a clear margin: the widened path has the same numerics, so a near tie (or a measurement
    # disturbed by load) must not pick the path that is 10-100x slower on CPUs without bf16 matrix units.
    # A bf16 GEMM many times slower than fp32 (a fallback kernel, 100x on AVX2-only CPUs) decides at once: load
    # cannot open a gap that wide between interleaved trials, and each slow trial costs ~0.2 s of start-up.
    bf16 = fp32 = 0.0
    for _ in range(7):
        bf16 = max(bf16, matmul_gflops(torch.bfloat16, trials=1))
        fp32 = max(fp32, matmul_gflops(torch.float32, trials=1))
        if bf16 * CLEAR_LOSS < fp32:
            break
    measured = f"{'/'.join(sorted(flags))}; 512^3 GEMM bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s"
    return MatmulPlan("bf16", measured) if bf16 >= NATIVE_MARGIN * fp32 else MatmulPlan("fp32", measured)


_MATMULS = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                      torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm,
                      torch.Tensor.baddbmm})


def _widen(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


class WidenedBf16Matmuls(TorchFunctionMode):
    """While active, a matmul with a bf16 operand computes in fp32 and returns its usual (bf16) result dtype.

    The casts are ordinary autograd ops, so the backward's GEMMs are fp32 too. A TorchFunctionMode sees the calls
    made inside autograd.Functions' forwards as well (the fused LM-head loss), and applies from outside the model.
    ``widens_bf16_matmuls`` tells code that runs its own GEMMs (llama.loss's fused LM-head loss) that bf16 matmuls
    compute in fp32 here, so it can write fp32 results in place instead of casting through bf16 copies.
    """

    widens_bf16_matmuls = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MATMULS or not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*args, **kwargs)
        out = kwargs.pop("out", None)
        result = func(*map(_widen, args), **kwargs)
        dtype = torch.bfloat16 if out is None else out.dtype
        if out is not None:
            return out.copy_(result)
        return result.to(dtype)


def compute_context(precision: str, device_type: str, plan: MatmulPlan):
    """The context a forward runs in: bf16 autocast for mixed, widened bf16 matmuls for a plan "fp32" on bf16
    parameters, nothing otherwise."""
    if precision == "mixed":
        return autocast_context(precision, device_type)
    if precision == "bf16-sr" and plan.compute == "fp32":
        return WidenedBf16Matmuls()
    return contextlib.nullcontext()
