"""Per-kernel report on the NKI interpreter: estimated time on trn1 (kernels.sim.cost), roofline, bytes.

Each forward and backward kernel runs once through its torch-level launcher (``kernels/<op>.py``) on CPU
tensors, i.e. on ``kernels.sim``, at the per-tensor-parallel-rank shapes of Llama 2 (TP=8, sequence 4096,
micro-batch 1, bf16; model sizes from ``llama.config`` presets). The interpreter's trace gives the instructions
per engine and the bytes every DMA moved between HBM and on-chip memory; ``kernels.sim.cost.estimate`` turns the
trace into an estimated time on one NeuronCore-v2 (documented per-instruction formulas, not a measurement).

Columns (``Row``):
* est_us: the cost model's total time; bound: its bound engine ("latency" when no engine is busy >= 50%);
  busy_*: percent of est_us each engine (dma = mean of the 16 DMA queues) is busy.
* floor_us: roofline floor = max(useful FLOPs / TensorE bf16 peak, minimum bytes / HBM bandwidth)
  (``kernels.sim.cost.roofline_floor_us``). Useful FLOPs: 0 for the elementwise kernels (no matmul is needed);
  attention counts only the unmasked (causal) query-key pairs, S(S+1)/2 per head: forward 2 matmuls
  (QK^T, PV) = 4*D FLOPs per pair, backward 5 (QK^T recomputed, dP = dO V^T, dV, dK, dQ) = 10*D per pair
  (FlashAttention-2's convention, backward = 2.5x forward). TensorE transposes are not useful FLOPs.
* pct_roofline = 100 * floor_us / est_us: how close the kernel is to the roofline in the model. Above 100 is
  impossible and flagged (it would mean a bug in the model or in the minimum counts).
* Minimum bytes: each launcher input read once plus each launcher output written once (tensor sizes as the
  launchers take and return them, e.g. RoPE's cos/sin as [B,S,D]); hbm_ratio = HBM bytes moved / minimum.

RMSNorm is reported at the non-sequence-parallel shape, rows = seq = 4096 (with sequence parallelism each
rank normalises 4096/8 = 512 rows of the same width). Attention (kernels/attention.py) is causal with the
default scale; its backward takes o and lse from the float32 PyTorch reference
(kernels.reference.flash_attention_ref), so that only the kernel under test runs on the interpreter. Its minimum
counts lse (fp32) as an output of the forward and an input of the backward.

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
BUSY_ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")


def _llama2(name):
    from llama.config import LlamaConfig
    c = LlamaConfig.preset(f"llama2-{name}")
    return dict(hidden=c.hidden_size, heads=c.num_heads, kv_heads=c.num_kv_heads, ffn=c.intermediate_size)


# Llama 2 model dimensions (Touvron et al. 2023, table 1 / HF configs) from llama.config's presets.
MODELS = {name: _llama2(name) for name in ("7b", "13b", "70b")}


def rank_shapes(model: str, seq: int = SEQ) -> dict:
    """Per-TP-rank shapes of one layer's fused kernels for a model name in MODELS (sequence ``seq``)."""
    m = MODELS[model]
    return dict(
        rows=MICRO_BATCH * seq,
        seq=seq,
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
    useful_flops: Callable[[dict], int] = lambda s: 0  # FLOPs the roofline counts (module docstring)


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
    ang = torch.arange(s["seq"], dtype=torch.float32)[:, None] * inv
    emb = torch.cat((ang, ang), -1).expand(MICRO_BATCH, s["seq"], HEAD_DIM)
    return emb.cos().to(dt).contiguous(), emb.sin().to(dt).contiguous()


def _rope_args(s, dt, seed):
    q = _randn(MICRO_BATCH, s["q_heads"], s["seq"], HEAD_DIM, dtype=dt, seed=seed)
    k = _randn(MICRO_BATCH, s["kv_heads"], s["seq"], HEAD_DIM, dtype=dt, seed=seed + 1)
    return (q, k, *_rope_tables(s, dt))


def _swiglu_fwd(s, dt):
    return (_randn(s["rows"], s["ffn"], dtype=dt, seed=6, scale=3.0), _randn(s["rows"], s["ffn"], dtype=dt, seed=7))


def _swiglu_bwd(s, dt):
    return (_randn(s["rows"], s["ffn"], dtype=dt, seed=8), *_swiglu_fwd(s, dt))


def _attn_fwd(s, dt):
    q = _randn(MICRO_BATCH, s["q_heads"], s["seq"], HEAD_DIM, dtype=dt, seed=10)
    k = _randn(MICRO_BATCH, s["kv_heads"], s["seq"], HEAD_DIM, dtype=dt, seed=11)
    v = _randn(MICRO_BATCH, s["kv_heads"], s["seq"], HEAD_DIM, dtype=dt, seed=12)
    return (q, k, v)


def _attn_bwd(s, dt):
    from kernels.reference import flash_attention_ref
    q, k, v = _attn_fwd(s, dt)
    o, lse = flash_attention_ref(q, k, v, causal=True)
    return (q, k, v, o, _randn(*q.shape, dtype=dt, seed=13), lse.float())


def _attn_flops(s, matmuls):
    """2*D FLOPs per matmul per unmasked (causal) query-key pair, S(S+1)/2 pairs per query head."""
    pairs = s["seq"] * (s["seq"] + 1) // 2
    return matmuls * 2 * HEAD_DIM * pairs * MICRO_BATCH * s["q_heads"]


KERNELS = {
    "rmsnorm": KernelSpec(
        module="rmsnorm",
        describe=lambda s: f"x[{s['rows']},{s['hidden']}]",
        directions=(Direction("fwd", "rms_norm_fwd", _rms_fwd), Direction("bwd", "rms_norm_bwd", _rms_bwd))),
    "rope": KernelSpec(
        module="rope",
        describe=lambda s: f"q[{MICRO_BATCH},{s['q_heads']},{s['seq']},{HEAD_DIM}] k[{MICRO_BATCH},{s['kv_heads']},{s['seq']},{HEAD_DIM}]",
        directions=(Direction("fwd", "rope_fwd", lambda s, dt: _rope_args(s, dt, 4)),
                    Direction("bwd", "rope_bwd", lambda s, dt: _rope_args(s, dt, 9)))),
    "swiglu": KernelSpec(
        module="swiglu",
        describe=lambda s: f"gate,up[{s['rows']},{s['ffn']}]",
        directions=(Direction("fwd", "swiglu_fwd", _swiglu_fwd), Direction("bwd", "swiglu_bwd", _swiglu_bwd))),
    "attention": KernelSpec(
        module="attention",
        # q [B, Hq, S, D] and k/v [B, Hkv, S, D] as "q,kv[B,Hq/Hkv,S,D]" (keeps the table's column width)
        describe=lambda s: f"q,kv[{MICRO_BATCH},{s['q_heads']}/{s['kv_heads']},{s['seq']},{HEAD_DIM}] causal",
        directions=(Direction("fwd", "flash_attention_fwd", _attn_fwd, lambda s: _attn_flops(s, 2)),
                    Direction("bwd", "flash_attention_bwd", _attn_bwd, lambda s: _attn_flops(s, 5)))),
}


# --------------------------------------------------------------------------- measurement

# Issue 11 targets, percent of roofline in the model (benchmark figures, not tests): flash attention forward 70%,
# backward 50% of TensorE peak (unmasked FLOPs; attention's floor is FLOP-bound at these shapes); every other
# kernel 75% of its HBM roofline.
TARGET_PCT = {("attention", "fwd"): 70.0, ("attention", "bwd"): 50.0}
DEFAULT_TARGET_PCT = 75.0


def target_pct(kernel: str, direction: str) -> float:
    return TARGET_PCT.get((kernel, direction), DEFAULT_TARGET_PCT)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def select(kernels=None, models=None, directions=None, table=None) -> list[tuple]:
    """(kernel, direction, model) triples in report order; None selects all. Unknown names: ValueError."""
    table = table or KERNELS
    for what, given, known in (("kernel", kernels, table), ("shape", models, MODELS),
                               ("direction", directions, ("fwd", "bwd"))):
        bad = [g for g in (given or ()) if g not in known]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    out = []
    for m in models or MODELS:
        for k in kernels or table:
            for d in table[k].directions:
                if directions is None or d.name in directions:
                    out.append((k, d.name, m))
    return out


def direction_spec(kernel: str, direction: str, table: dict | None = None) -> Direction:
    spec = (table or KERNELS)[kernel]
    for d in spec.directions:
        if d.name == direction:
            return d
    raise ValueError(f"kernel {kernel!r} has no direction {direction!r}")


def launcher_inputs(kernel, direction, model="7b", seq=SEQ, dtype=torch.bfloat16, table=None):
    """(launcher function, its arguments (CPU tensors), shapes dict) of one kernel direction."""
    spec = (table or KERNELS)[kernel]
    d = direction_spec(kernel, direction, table)
    shapes = rank_shapes(model, seq)
    fn = getattr(importlib.import_module(f"kernels.{spec.module}"), d.launcher)
    return fn, d.inputs(shapes, dtype), shapes


@dataclasses.dataclass
class Row:
    kernel: str
    direction: str
    model: str
    shape: str
    dtype: str
    engines: dict                # instructions per engine (trace)
    hbm_read: int
    hbm_written: int
    min_bytes: int
    useful_flops: int
    est_us: float                # kernels.sim.cost estimate
    floor_us: float              # roofline floor
    bound: str
    busy: dict                   # percent of est_us per engine (BUSY_ENGINES)
    tensor_flops_pct: float      # matmul FLOPs executed / (est_us x TensorE peak), transposes excluded
    wall_s: float                # interpreter CPU wall time
    model_s: float               # cost-model wall time
    measured_us: float | None = None   # on a Neuron device (bench_kernels.device), else None
    baseline_us: float | None = None   # est_us of the same row in a --baseline CSV (an earlier run), else None
    report: object = dataclasses.field(default=None, repr=False)   # CostReport when kept
    labels: dict = dataclasses.field(default=None, repr=False)     # timeline labels (charts.dma_labels) when kept

    @property
    def ratio(self) -> float:
        return (self.hbm_read + self.hbm_written) / self.min_bytes

    @property
    def pct_roofline(self) -> float:
        return 100.0 * self.floor_us / self.est_us if self.est_us else 0.0

    @property
    def impossible(self) -> bool:
        """An estimate below the roofline floor cannot be: a model or minimum-count bug."""
        return self.pct_roofline > 100.0 + 1e-9

    def as_dict(self) -> dict:
        d = dict(kernel=self.kernel, direction=self.direction, model=self.model, shape=self.shape,
                 dtype=self.dtype, est_us=round(self.est_us, 3), floor_us=round(self.floor_us, 3),
                 pct_roofline=round(self.pct_roofline, 2), target_pct=target_pct(self.kernel, self.direction),
                 bound=self.bound)
        d.update({f"busy_{e}_pct": round(self.busy.get(e, 0.0), 2) for e in BUSY_ENGINES})
        d.update(tensor_flops_pct=round(self.tensor_flops_pct, 2), useful_flops=self.useful_flops)
        d.update({f"n_{e}": self.engines.get(e, 0) for e in ENGINES})
        d.update(n_total=sum(self.engines.values()), hbm_read=self.hbm_read, hbm_written=self.hbm_written,
                 min_bytes=self.min_bytes, hbm_ratio=round(self.ratio, 4),
                 measured_us="" if self.measured_us is None else round(self.measured_us, 3),
                 baseline_us="" if self.baseline_us is None else round(self.baseline_us, 3),
                 wall_s=round(self.wall_s, 3), model_s=round(self.model_s, 3))
        return d


CSV_COLUMNS = tuple(Row("", "", "", "", "", {}, 0, 0, 1, 0, 1.0, 0.0, "", {}, 0.0, 0.0, 0.0).as_dict())


def measure_one(kernel: str, direction: str, model: str = "7b", seq: int = SEQ, dtype: torch.dtype = torch.bfloat16,
                keep_report: bool = False, table: dict | None = None) -> Row:
    """Run one kernel direction on the interpreter, estimate its trn1 time; one Row."""
    from kernels.sim import cost, trace      # the interpreter and its cost model; only needed here

    spec = (table or KERNELS)[kernel]
    fn, args, shapes = launcher_inputs(kernel, direction, model, seq, dtype, table)
    t0 = time.perf_counter()
    with trace.record() as tr:
        out = fn(*args)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = cost.estimate(tr)
    model_s = time.perf_counter() - t0
    rd, wr = tr.hbm_bytes()
    min_bytes = _nbytes(_tensors(args)) + _nbytes(_tensors(out))
    flops = direction_spec(kernel, direction, table).useful_flops(shapes)
    return Row(kernel=kernel, direction=direction, model=model, shape=spec.describe(shapes),
               dtype=str(dtype).replace("torch.", ""), engines=tr.counts_by_engine(), hbm_read=rd, hbm_written=wr,
               min_bytes=min_bytes, useful_flops=flops, est_us=rep.total_us,
               floor_us=cost.roofline_floor_us(flops, min_bytes, fp32=dtype == torch.float32), bound=rep.bound,
               busy={e: rep.busy_pct.get(e, 0.0) for e in BUSY_ENGINES},
               tensor_flops_pct=rep.tensor_util["flops_pct"], wall_s=wall, model_s=model_s,
               report=rep if keep_report else None, labels=_labels(tr) if keep_report else None)


def _labels(tr):
    from bench_kernels.charts import dma_labels
    return dma_labels(tr.instructions)


def measure(kernel: str, model: str = "7b", dtype: torch.dtype = torch.bfloat16, seq: int = SEQ,
            keep_report: bool = False, table: dict | None = None) -> list[Row]:
    """Every direction of one kernel (one Row each)."""
    return [measure_one(kernel, d.name, model, seq, dtype, keep_report, table)
            for d in (table or KERNELS)[kernel].directions]


def _baseline_cells(r, on):
    """'before us' and 'speedup' (baseline / estimate) cells when a baseline is shown."""
    if not on:
        return []
    if r.baseline_us is None:
        return ["-", "-"]
    return [f"{r.baseline_us:.1f}", f"{r.baseline_us / r.est_us:.2f}x"]


def format_table(rows: list[Row]) -> str:
    measured = any(r.measured_us is not None for r in rows)
    base = any(r.baseline_us is not None for r in rows)
    head = ["kernel", "dir", "model", "shape", *(["before us"] if base else []), "est us",
            *(["speedup"] if base else []), *(["measured us"] if measured else []), "floor us",
            "% roof", "bound", *(f"{e} %" for e in BUSY_ENGINES), "HBM/min", "instrs", "wall s"]
    body = []
    for r in rows:
        meas = [] if not measured else ["-" if r.measured_us is None else f"{r.measured_us:.1f}"]
        b = _baseline_cells(r, base)
        body.append([r.kernel, r.direction, r.model, r.shape, *b[:1], f"{r.est_us:.1f}", *b[1:], *meas,
                     f"{r.floor_us:.1f}",
                     f"{r.pct_roofline:.1f}" + ("!" if r.impossible else ""), r.bound,
                     *(f"{r.busy.get(e, 0.0):.0f}" for e in BUSY_ENGINES), f"{r.ratio:.3f}",
                     f"{sum(r.engines.values()):,}", f"{r.wall_s:.2f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) if i >= 4 and head[i] != "bound" else c.ljust(w)
                        for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """The table as Markdown (for the README): kernel, direction, model, estimate, floor, % of roofline, target,
    bound, busy % per engine, HBM bytes / minimum."""
    base = any(r.baseline_us is not None for r in rows)
    head = ["kernel", "dir", "model", *(["before us"] if base else []), "est us", *(["speedup"] if base else []),
            "floor us", "% roof", "target %", "bound", *(f"{e} %" for e in BUSY_ENGINES), "HBM/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        b = _baseline_cells(r, base)
        cells = [r.kernel, r.direction, r.model, *b[:1], f"{r.est_us:.1f}", *b[1:], f"{r.floor_us:.1f}",
                 f"{r.pct_roofline:.1f}",
                 f"{target_pct(r.kernel, r.direction):.0f}", r.bound,
                 *(f"{r.busy.get(e, 0.0):.0f}" for e in BUSY_ENGINES), f"{r.ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_baseline(path: str) -> dict:
    """{(kernel, direction, model): (shape, est_us)} from a CSV this report wrote. ValueError when unreadable."""
    import csv
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"--baseline {path}: {e.strerror}") from None
    need = ("kernel", "direction", "model", "shape", "est_us")
    if rows and any(k not in rows[0] for k in need):
        raise ValueError(f"--baseline {path}: not a bench_kernels CSV (needs columns {', '.join(need)})")
    out = {}
    for i, r in enumerate(rows, 2):
        try:
            out[(r["kernel"], r["direction"], r["model"])] = (r["shape"], float(r["est_us"]))
        except ValueError:
            raise ValueError(f"--baseline {path} line {i}: est_us {r['est_us']!r} is not a number") from None
    return out
