"""Per-kernel cost report on the NKI interpreter: instructions per engine and HBM<->SBUF bytes vs the minimum.

Each forward and backward kernel runs once through its torch-level launcher (``kernels/<op>.py``) on CPU
tensors, i.e. on ``kernels.sim``, at the per-tensor-parallel-rank shapes of Llama 2 (TP=8, sequence 4096,
micro-batch 1, bf16). The interpreter's trace gives the instruction count per engine and the bytes every
DMA moved between HBM and on-chip memory. The minimum is each launcher input read once plus each launcher
output written once (tensor sizes as the launchers take and return them, e.g. RoPE's cos/sin as [B,S,D]).
Target: ratio <= 1.1 for every kernel and direction.

RMSNorm is reported at the non-sequence-parallel shape, rows = seq = 4096 (with sequence parallelism each
rank normalises 4096/8 = 512 rows of the same width; bytes scale with the rows, so the ratio barely moves).
Attention (kernels/attention.py) is causal with the default scale; its backward takes o and lse from the
float32 PyTorch reference (kernels.reference.flash_attention_ref), so that only the kernel under test runs
on the interpreter. Its minimum counts lse (fp32) as an output of the forward and an input of the backward.

To add a kernel: add one ``KernelSpec`` to ``KERNELS``.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Callable

import torch

TP = 8
SEQ = 4096
MICRO_BATCH = 1
HEAD_DIM = 128
ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma", "sync")

# Llama 2 model dimensions (Touvron et al. 2023, table 1 / HF configs): hidden, heads, kv heads, FFN width.
MODELS = {
    "7b": dict(hidden=4096, heads=32, kv_heads=32, ffn=11008),
    "13b": dict(hidden=5120, heads=40, kv_heads=40, ffn=13824),
    "70b": dict(hidden=8192, heads=64, kv_heads=8, ffn=28672),
}


def rank_shapes(model: str) -> dict:
    """Per-TP-rank shapes of one layer's fused kernels for a model name in MODELS."""
    m = MODELS[model]
    return dict(
        rows=MICRO_BATCH * SEQ,
        hidden=m["hidden"],
        q_heads=m["heads"] // TP,
        kv_heads=max(1, m["kv_heads"] // TP),      # kv heads are replicated when TP > kv heads
        ffn=m["ffn"] // TP,
    )


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------- kernel table

@dataclasses.dataclass(frozen=True)
class Direction:
    name: str                                   # "fwd" | "bwd"
    launcher: str                               # function name in the kernel module
    inputs: Callable[[dict, torch.dtype], tuple]  # (shapes, dtype) -> launcher arguments


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    module: str                                 # kernels.<module>
    describe: Callable[[dict], str]             # shape column of the table
    directions: tuple


def _rms_fwd(s, dt):
    return (_randn(s["rows"], s["hidden"], dtype=dt, seed=1), _randn(s["hidden"], dtype=dt, seed=2), 1e-5)


def _rms_bwd(s, dt):
    x, w, _eps = _rms_fwd(s, dt)
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1) + 1e-5)
    return (_randn(s["rows"], s["hidden"], dtype=dt, seed=3), x, w, rstd)


def _rope_tables(s, dt):
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    ang = torch.arange(SEQ, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((ang, ang), -1).expand(MICRO_BATCH, SEQ, HEAD_DIM)
    return emb.cos().to(dt).contiguous(), emb.sin().to(dt).contiguous()


def _rope_args(s, dt, seed):
    q = _randn(MICRO_BATCH, s["q_heads"], SEQ, HEAD_DIM, dtype=dt, seed=seed)
    k = _randn(MICRO_BATCH, s["kv_heads"], SEQ, HEAD_DIM, dtype=dt, seed=seed + 1)
    return (q, k, *_rope_tables(s, dt))


def _swiglu_fwd(s, dt):
    return (_randn(s["rows"], s["ffn"], dtype=dt, seed=6, scale=3.0), _randn(s["rows"], s["ffn"], dtype=dt, seed=7))


def _swiglu_bwd(s, dt):
    return (_randn(s["rows"], s["ffn"], dtype=dt, seed=8), *_swiglu_fwd(s, dt))


def _attn_fwd(s, dt):
    q = _randn(MICRO_BATCH, s["q_heads"], SEQ, HEAD_DIM, dtype=dt, seed=10)
    k = _randn(MICRO_BATCH, s["kv_heads"], SEQ, HEAD_DIM, dtype=dt, seed=11)
    v = _randn(MICRO_BATCH, s["kv_heads"], SEQ, HEAD_DIM, dtype=dt, seed=12)
    return (q, k, v)


def _attn_bwd(s, dt):
    from kernels.reference import flash_attention_ref
    q, k, v = _attn_fwd(s, dt)
    o, lse = flash_attention_ref(q, k, v, causal=True)
    return (q, k, v, o, _randn(*q.shape, dtype=dt, seed=13), lse.float())


KERNELS = {
    "rmsnorm": KernelSpec(
        module="rmsnorm",
        describe=lambda s: f"x[{s['rows']},{s['hidden']}]",
        directions=(Direction("fwd", "rms_norm_fwd", _rms_fwd), Direction("bwd", "rms_norm_bwd", _rms_bwd))),
    "rope": KernelSpec(
        module="rope",
        describe=lambda s: f"q[{MICRO_BATCH},{s['q_heads']},{SEQ},{HEAD_DIM}] k[{MICRO_BATCH},{s['kv_heads']},{SEQ},{HEAD_DIM}]",
        directions=(Direction("fwd", "rope_fwd", lambda s, dt: _rope_args(s, dt, 4)),
                    Direction("bwd", "rope_bwd", lambda s, dt: _rope_args(s, dt, 9)))),
    "swiglu": KernelSpec(
        module="swiglu",
        describe=lambda s: f"gate,up[{s['rows']},{s['ffn']}]",
        directions=(Direction("fwd", "swiglu_fwd", _swiglu_fwd), Direction("bwd", "swiglu_bwd", _swiglu_bwd))),
    "attention": KernelSpec(
        module="attention",
        # q [B, Hq, S, D] and k/v [B, Hkv, S, D] as "q,kv[B,Hq/Hkv,S,D]" (keeps the table's column width)
        describe=lambda s: f"q,kv[{MICRO_BATCH},{s['q_heads']}/{s['kv_heads']},{SEQ},{HEAD_DIM}] causal",
        directions=(Direction("fwd", "flash_attention_fwd", _attn_fwd),
                    Direction("bwd", "flash_attention_bwd", _attn_bwd))),
}


# --------------------------------------------------------------------------- measurement

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@dataclasses.dataclass
class Row:
    kernel: str
    direction: str
    shape: str
    dtype: str
    engines: dict
    hbm_read: int
    hbm_written: int
    min_bytes: int
    wall_s: float
    instructions: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def ratio(self) -> float:
        return (self.hbm_read + self.hbm_written) / self.min_bytes

    def as_dict(self) -> dict:
        d = dict(kernel=self.kernel, direction=self.direction, shape=self.shape, dtype=self.dtype)
        d.update({f"n_{e}": self.engines.get(e, 0) for e in ENGINES})
        d.update(n_total=sum(self.engines.values()), hbm_read=self.hbm_read, hbm_written=self.hbm_written,
                 min_bytes=self.min_bytes, ratio=round(self.ratio, 4), wall_s=round(self.wall_s, 3))
        return d


def measure(kernel: str, model: str = "7b", dtype: torch.dtype = torch.bfloat16, keep_trace: bool = False,
            kernels: dict | None = None) -> list[Row]:
    """Run every direction of one kernel on the interpreter and return one Row per direction."""
    from kernels.sim import trace      # the interpreter; only needed here

    spec = (kernels or KERNELS)[kernel]
    shapes = rank_shapes(model)
    module = importlib.import_module(f"kernels.{spec.module}")
    rows = []
    for d in spec.directions:
        args = d.inputs(shapes, dtype)
        fn = getattr(module, d.launcher)
        t0 = time.perf_counter()
        with trace.record() as tr:
            out = fn(*args)
        wall = time.perf_counter() - t0
        rd, wr = tr.hbm_bytes()
        rows.append(Row(kernel=kernel, direction=d.name, shape=spec.describe(shapes),
                        dtype=str(dtype).replace("torch.", ""), engines=tr.counts_by_engine(), hbm_read=rd,
                        hbm_written=wr, min_bytes=_nbytes(_tensors(args)) + _nbytes(_tensors(out)), wall_s=wall,
                        instructions=list(tr.instructions) if keep_trace else []))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["kernel", "dir", "shape", "dtype", *ENGINES, "HBM read", "HBM written", "min bytes", "ratio", "wall s"]
    body = []
    for r in rows:
        body.append([r.kernel, r.direction, r.shape, r.dtype, *(str(r.engines.get(e, 0)) for e in ENGINES),
                     f"{r.hbm_read:,}", f"{r.hbm_written:,}", f"{r.min_bytes:,}", f"{r.ratio:.3f}",
                     f"{r.wall_s:.2f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)
