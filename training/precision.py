"""Precision modes and fp32 -> bf16 stochastic rounding (SR).

Modes (``--precision``):
    bf16-sr  parameters and gradients in bf16; the AdamW math in fp32 (``training.optim.SRAdamW``), parameters
             written back with stochastic rounding. On XLA devices the Neuron runtime rounds stochastically in
             hardware (``NEURON_RT_STOCHASTIC_ROUNDING_EN=1``, seed ``NEURON_RT_STOCHASTIC_ROUNDING_SEED``), so the
             write-back is a plain cast there. On CPU/GPU only the weight update is stochastically rounded
             (torchao/llm.c style); Trainium rounds every internal fp32->bf16 cast, so parity is statistical.
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

Random bits: ``torch.randint`` from a ``torch.Generator`` seeded with ``sr_seed(seed, step, stream)``, a pure
function of the run seed, the optimizer step and a stream id; the SR state of a run is therefore fully
described by (seed, step), both of which are in every checkpoint, and resume reproduces the rounding bitwise.
"""
from __future__ import annotations

import os

import torch

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


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 tensor -> bf16 tensor, stochastically rounded (see the module docstring). Same shape and device."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16: expected a float32 tensor, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    # int32 addition is the uint32 addition of the bit patterns except where it wraps past 0xFFFFFFFF, which only
    # negative NaNs (0xFFFF0001..) can reach; NaNs are restored below.
    rounded = ((bits + r) & -65536).view(torch.float32).to(torch.bfloat16)   # low bits are zero: exact cast
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


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
