"""A NeuronCore-v2 (trn1) timeline cost model of an instruction trace (``kernels.sim.trace``).

Use::

    from kernels.sim import trace, cost
    with trace.record() as tr:
        kernel(x)
    r = cost.estimate(tr)            # or cost.estimate(trace.last())
    print(r.summary())
    r.total_us, r.busy_pct["tensor"], r.bound, r.tensor_util["flops_pct"], r.hbm_gbps

API
---
``estimate(trace, target="trn1") -> CostReport`` (``trace``: a Trace or any sequence of Instruction).

``CostReport`` fields: ``total_us`` (estimated kernel time), ``busy_us`` / ``busy_pct`` (per queue: "tensor",
"vector", "scalar", "gpsimd", "sync", "dma0".."dma15", and "dma" = mean occupancy of the 16 DMA queues; pct of
total_us), ``critical_path`` (instruction indices, first to last, of the chain of constraints that ends last),
``bound`` ("tensor"|"vector"|"scalar"|"gpsimd"|"dma"|"latency") with ``bound_rule`` (the rule in words),
``tensor_util`` ({"active_pct": TensorE busy / total, "flops_pct": matmul FLOPs / (total x peak)}), ``flops``
(2*K*M*N summed over nc_matmul), ``hbm_bytes`` ((read, written)), ``hbm_gbps`` (achieved, (read+written) /
total), ``hbm_util_pct`` (vs ``HBM_BW``), ``start_us`` / ``end_us`` (per instruction index), ``timeline``
(``TimelineEntry(index, queue, start_us, end_us, op, name, engine)``, one per instruction and queue it occupied:
a DMA has one per DMA queue its packets ran on), ``assumptions`` ({op: note} for every op costed with an
assumed formula), ``n_instructions``, ``target``. ``summary()`` is printable text; ``chrome_trace()`` a
Chrome-trace (chrome://tracing, Perfetto) JSON-able dict of the timeline. ``roofline_floor_us(flops,
hbm_bytes)`` is the roofline floor: max(FLOPs / TensorE peak, bytes / HBM bandwidth).

Model (constants and their sources: ``kernels.sim.cost_constants``)
------------------------------------------------------------------
Instructions are placed one at a time in trace (program) order (list scheduling):

* Queues. Each compute engine (tensor, vector, scalar, gpsimd, sync) is one in-order queue: an instruction
  starts no earlier than the previous instruction of its engine ended. DMA: 16 queues (DMA engines). A
  dma_copy is split into k = min(16, ceil(P / 8)) packets, P = partitions of its SBUF side (16 when both ends
  are HBM), one per engine, each placed in the earliest gap of a queue at or after the transfer's ready time
  plus its fixed cost, on the k queues with the earliest gaps (the trace does not record a queue choice; the
  hardware spreads a transfer over "up to 16 DMA engines, depending on the shape" [DMA]). DMA queues are filled
  by readiness, not program order: DMA triggers are asynchronous and scheduled by their dependencies, so a load
  that is ready overtakes a store that waits for compute. How far loads run ahead is bounded only by the
  kernel's buffer reuse (WAR on a reused tile); a tile allocated afresh in each loop iteration is a new buffer
  (the interpreter checks SBUF capacity in program order, the model does not re-check it under reordering).
* Dependencies from the operands' byte spans (trace: space, span, access): an instruction starts after every
  earlier instruction that wrote memory it reads (RAW: writer end + the writer engine's dependent-instruction
  latency, except TensorE -> TensorE PSUM accumulation, which pipelines), after every earlier reader of memory it
  writes (WAR: reader end) and after every earlier writer of it (WAW: writer end). Spans overlap when their
  partition ranges and byte ranges both intersect in the same space. HBM WAW is not ordered: the byte range of a
  strided HBM view over-approximates it, so stores of disjoint blocks of one output would be falsely serialised
  (a real overwrite is always preceded by a read in our kernels, which orders it through RAW/WAR). A DMA waits
  for no engine latency: its fixed cost covers the semaphore handshake.
* Ports (NeuronCore-v2 [ARCH]): VectorE and GpSimd share the SBUF port (an instruction of either that touches
  SBUF cannot overlap one of the other); VectorE and ScalarE cannot access PSUM in parallel. A port is a busy
  interval list; an instruction takes the earliest gap that fits at or after its other constraints.
* Durations: the per-instruction cycle formulas of the nki.isa docs (``_CYCLES`` below), at the engine clock.
  N = elements per partition (free size) of the instruction's main input. The VectorE fast paths depend on the
  ALU op, which the trace records (``Instruction.alu``). DMA packet: setup + bytes / rate,
  rate = min(27.2 GB/s, HBM share) where the HBM share is HBM_BW / (number of DMA queues busy when the packet
  starts x HBM endpoints of the transfer); the transfer also waits the fixed issue latency before moving bytes.
* bound: the queue with the highest busy fraction (DMA: mean queue occupancy, or HBM utilisation if higher)
  when it is >= BOUND_MIN_BUSY, else "latency".

Left out: instruction issue/decode on the engines' sequencers, SBUF bank conflicts, PSUM bank-level detail,
the LoadStationary cost of TensorE (documented as running in the background), DMA descriptor limits and
element-size effects below 512 B, clock throttling. Every result is an estimate from documented formulas, not a
measurement.
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from . import cost_constants as C

__all__ = ["estimate", "CostReport", "TimelineEntry", "roofline_floor_us"]

COMPUTE_QUEUES = ("tensor", "vector", "scalar", "gpsimd", "sync")
DMA_QUEUES = tuple(f"dma{i}" for i in range(C.DMA_ENGINES))
_HZ = {"tensor": C.TENSOR_HZ, "vector": C.VECTOR_HZ, "scalar": C.SCALAR_HZ, "gpsimd": C.GPSIMD_HZ,
       "sync": C.SYNC_HZ}
_LAT_NS = {e: C.DEP_LATENCY_CYCLES[e] / _HZ[e] * 1e9 for e in COMPUTE_QUEUES}
_HBM = ("hbm", "private_hbm", "shared_hbm")
_MAIN_INPUT_ROLES = ("data", "src", "data1", "data0", "on_true", "on_true_tile", "moving")


class TimelineEntry(NamedTuple):
    index: int          # instruction index in the trace
    queue: str          # "tensor", "vector", "scalar", "gpsimd", "sync", "dma0".."dma15"
    start_us: float
    end_us: float
    op: str
    name: object        # the instruction's name= argument (or None)
    engine: str         # the trace's engine ("dma" for every DMA queue)


@dataclass
class CostReport:
    target: str
    n_instructions: int
    total_us: float
    busy_us: dict
    busy_pct: dict
    critical_path: list
    bound: str
    bound_rule: str
    tensor_util: dict
    flops: int
    hbm_bytes: tuple
    hbm_gbps: float
    hbm_util_pct: float
    start_us: list = field(repr=False)
    end_us: list = field(repr=False)
    timeline: list = field(repr=False)
    assumptions: dict = field(default_factory=dict)
    ops: list = field(default_factory=list, repr=False)

    def summary(self):
        """Printable multi-line text: time, bound, utilisation, busy per engine, critical path."""
        rd, wr = self.hbm_bytes
        lines = [f"estimated {self.total_us:.2f} us on {self.target} (NeuronCore-v2 timeline model from "
                 f"documented formulas; {self.n_instructions} instructions)",
                 f"bound: {self.bound} ({self.bound_rule})",
                 f"TensorE: active {self.tensor_util['active_pct']:.1f}%, {self.flops / 1e9:.3f} GFLOP = "
                 f"{self.tensor_util['flops_pct']:.1f}% of {C.TENSOR_PEAK_FLOPS / 1e12:.2f} TFLOPS bf16 peak",
                 f"HBM: read {rd:,} B, written {wr:,} B, {self.hbm_gbps:.1f} GB/s = {self.hbm_util_pct:.1f}% of "
                 f"{C.HBM_BW / 1e9:.0f} GB/s",
                 "busy: " + ", ".join(f"{q} {self.busy_pct[q]:.1f}%" for q in COMPUTE_QUEUES + ("dma",)
                                      if self.busy_us.get(q)),
                 f"critical path: {len(self.critical_path)} instructions"]
        if self.critical_path:
            counts = {}
            for i in self.critical_path:
                counts[self.ops[i]] = counts.get(self.ops[i], 0) + 1
            lines[-1] += " (" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ")"
        for op, note in sorted(self.assumptions.items()):
            lines.append(f"assumed cost for {op}: {note}")
        return "\n".join(lines)

    def chrome_trace(self):
        """The timeline as a Chrome trace-event dict (write with json.dump; open in chrome://tracing or
        Perfetto): one thread per queue, times in microseconds."""
        tids = {q: i for i, q in enumerate(COMPUTE_QUEUES + DMA_QUEUES)}
        ev = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": q}} for q, t in tids.items()]
        for e in self.timeline:
            ev.append({"name": e.op if e.name is None else f"{e.op} {e.name}", "ph": "X", "pid": 0,
                       "tid": tids[e.queue], "ts": e.start_us, "dur": e.end_us - e.start_us,
                       "args": {"index": e.index}})
        return {"traceEvents": ev, "displayTimeUnit": "ns",
                "otherData": {"model": "kernels.sim.cost (documented formulas, not a measurement)",
                              "total_us": self.total_us}}


def roofline_floor_us(flops, hbm_bytes, fp32=False):
    """Roofline floor in microseconds: max(FLOPs / TensorE peak (bf16, or fp32 = peak/4), bytes / HBM_BW)."""
    peak = C.TENSOR_PEAK_FLOPS / (C.MM_FP32_FACTOR if fp32 else 1)
    return max(flops / peak, hbm_bytes / C.HBM_BW) * 1e6


# -------------------------------------------------------------------------------------------- cycle formulas
def _free(o):
    n = 1
    for s in o.shape[1:]:
        n *= s
    return n


def _main(ins):
    ops = ins.operands
    for role in _MAIN_INPUT_ROLES:
        for o in ops:
            if o.role == role:
                return o
    return ops[0] if ops else None


def _dense(o):
    """The view's free elements are contiguous (its byte span equals its bytes per partition)."""
    return o.span is not None and o.span[3] - o.span[2] == o.nbytes // max(1, o.span[1])


def _mm_cycles(ins):
    r = {o.role: o for o in ins.operands}
    st, mv = r["stationary"], r["moving"]
    c = max(C.MM_INIT_LATENCY, max(min(C.MM_MOVING_FLOOR, _free(st)), _free(mv)))
    return c * (C.MM_FP32_FACTOR if st.dtype == "float32" else 1)


def _transpose_cycles(ins, engine):
    d = _main(ins)
    if engine == "tensor":
        p, f = d.shape[0], _free(d)
        c = max(C.MM_INIT_LATENCY, max(p, min(64, f)))
        return c * (C.MM_FP32_FACTOR if d.dtype == "float32" else 1)
    return max(C.MIN_II, _free(d))


def _tensor_tensor_cycles(ins, engine):
    ins_ops = [o for o in ins.operands if o.access == "r"]
    n = _free(ins_ops[0])
    if engine == "gpsimd":
        return C.GPSIMD_START + 2 * n
    if any(o.buffer == "psum" for o in ins_ops):
        return max(C.MIN_II, n)
    if (all(o.dtype == "bfloat16" and o.buffer == "sbuf" and _dense(o) for o in ins.operands)
            and _alu_in(ins, _TT_FAST_OPS)):
        return max(C.MIN_II, n)      # [ISA] bf16 SBUF add/multiply/subtract, contiguous free dim: 1 elem/cycle
    return max(C.MIN_II, 2 * n)


# VectorE fast paths by ALU op ([ISA] formulas, nki-spec 3.2): bf16 tensor_tensor add/multiply/subtract at N;
# bf16 tensor_reduce add/max at N/2; bf16 scalar_tensor_tensor subtract->multiply at N. Traces without the op
# (Instruction.alu None: an older trace) take the fast path and say so in CostReport.assumptions.
_TT_FAST_OPS = frozenset(("add", "multiply", "subtract"))
_REDUCE_FAST_OPS = frozenset(("add", "maximum"))
_STT_FAST_OPS = ("subtract", "multiply")


def _alu_in(ins, ops):
    alu = getattr(ins, "alu", None)
    return alu is None or alu[0] in ops


def _cycles(ins, engine):
    """(cycles, assumption note or None) of one compute instruction on ``engine``."""
    op = ins.op
    if op == "nc_matmul":
        return _mm_cycles(ins), None
    if op == "nc_transpose":
        return _transpose_cycles(ins, engine), None
    m = _main(ins)
    n = _free(m) if m is not None else 1
    if engine == "gpsimd":
        if op in ("iota", "affine_select"):
            return C.GPSIMD_START + n, None
        if op == "rsqrt":
            return C.GPSIMD_RSQRT_FACTOR * max(C.MIN_II, n), None
        if op == "tensor_tensor":
            return _tensor_tensor_cycles(ins, engine), "GPSIMD_START + 2N (like iota's START + N, two inputs)"
        if op == "tensor_partition_reduce":
            return (C.GPSIMD_START + n * math.ceil(m.shape[0] / 16),
                    "GPSIMD_START + N x ceil(P/16) (16 fp32 lanes per GpSimd core)")
        return C.GPSIMD_START + n, "GPSIMD_START + N (as iota/affine_select)"
    if engine == "scalar":
        if op in ("activation", "activation_reduce"):
            red = op == "activation_reduce" or any(o.role == "reduce_res" for o in ins.operands)
            return max(C.MIN_II, n) + (C.MIN_II if red else 0), None
        if op in ("tensor_scalar", "tensor_copy"):
            return max(C.MIN_II, n), None
        return max(C.MIN_II, n), "max(MIN_II, N) (ScalarE streaming)"
    if engine == "sync":
        return C.MIN_II, "MIN_II"
    # vector
    if op in ("tensor_scalar", "tensor_copy", "dropout", "bn_stats", "memset", "nc_stream_shuffle"):
        return max(C.MIN_II, n), None
    if op == "tensor_tensor":
        note = None
        if ins.alu is None and all(o.dtype == "bfloat16" and o.buffer == "sbuf" for o in ins.operands):
            note = "bf16 SBUF tensor_tensor assumed add/multiply/subtract (op not in the trace)"
        return _tensor_tensor_cycles(ins, engine), note
    if op == "tensor_reduce":
        d = next(o for o in ins.operands if o.role == "dst")
        if m.dtype == "bfloat16" and d.dtype == "bfloat16" and _alu_in(ins, _REDUCE_FAST_OPS):
            return max(C.MIN_II, n // 2), (None if ins.alu else
                                           "bf16 tensor_reduce assumed add or max (N/2; op not in the trace)")
        return max(C.MIN_II, n), None
    if op == "scalar_tensor_tensor":
        if (all(o.dtype == "bfloat16" for o in ins.operands if o.access == "r") and n % 2 == 0
                and (ins.alu is None or tuple(ins.alu) == _STT_FAST_OPS)):
            return max(C.MIN_II, n), (None if ins.alu else
                                      "bf16 scalar_tensor_tensor assumed subtract->multiply (N; ops not in trace)")
        return max(C.MIN_II, 2 * n), None
    if op == "tensor_scalar_reduce":
        return max(C.MIN_II, n) + C.MIN_II, None
    if op == "tensor_tensor_scan":
        return max(C.MIN_II, 2 * n), None
    if op == "reciprocal":
        return max(C.MIN_II, 8 * n), None
    if op == "bn_aggr":
        return max(C.MIN_II, 13 * (n // 3)), None
    if op == "select_reduce":
        red = any(o.role == "reduce_res" for o in ins.operands)
        return max(C.MIN_II, 2 * n) + (C.MIN_II if red else 0), "max(MIN_II, 2N) (+MIN_II with reduce_res)"
    return max(C.MIN_II, n), "max(MIN_II, N) (single-input VectorE formula)"


def _ports(ins, engine):
    """NeuronCore-v2 shared ports the instruction holds: 'sbuf_vg' (VectorE/GpSimd SBUF), 'psum_vs' (Vector/
    Scalar PSUM)."""
    if engine not in ("vector", "gpsimd", "scalar"):
        return ()
    ports = []
    bufs = {o.buffer for o in ins.operands}
    if engine != "scalar" and "sbuf" in bufs:
        ports.append("sbuf_vg")
    if engine != "gpsimd" and "psum" in bufs:
        ports.append("psum_vs")
    return ports


# ------------------------------------------------------------------------------------------------- helpers
class _Busy:
    """Disjoint busy intervals of one resource (a shared port or a DMA queue), sorted by start; touching
    intervals are merged so that a densely used resource stays a short list. Earliest-gap search."""
    __slots__ = ("starts", "ends", "idx")

    def __init__(self):
        self.starts, self.ends, self.idx = [], [], []

    def earliest(self, t, dur):
        """(earliest start >= t with [start, start+dur) free, index of the instruction that pushed it or None)."""
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, t) - 1
        who = None
        if i >= 0 and ends[i] > t:
            t, who = ends[i], self.idx[i]
        i += 1
        n = len(starts)
        while i < n and starts[i] < t + dur:
            t, who = ends[i], self.idx[i]
            i += 1
        return t, who

    def busy_at(self, t):
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and self.ends[i] > t

    def add(self, s, e, idx):
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, s)
        if i > 0 and ends[i - 1] >= s - 1e-6:            # touches the previous interval: extend it
            i -= 1
            ends[i] = max(ends[i], e)
            self.idx[i] = idx
        else:
            starts.insert(i, s)
            ends.insert(i, e)
            self.idx.insert(i, idx)
        if i + 1 < len(starts) and starts[i + 1] <= ends[i] + 1e-6:   # and the next one
            ends[i] = max(ends[i], ends[i + 1])
            self.idx[i] = self.idx[i + 1]
            del starts[i + 1], ends[i + 1], self.idx[i + 1]


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _rect(o):
    p0, pc, lo, hi = o.span
    return (p0, p0 + pc, lo, hi)


class _Space:
    """Accesses of one address space since they were last covered by a write: ``writes`` {rect: (index,
    engine)} (the latest write of each rect) and ``reads`` {rect: {engine: [indices]}}."""
    __slots__ = ("writes", "reads", "hbm")

    def __init__(self, hbm):
        self.writes, self.reads, self.hbm = {}, {}, hbm


def _contains(r, k):
    return r[0] <= k[0] and k[1] <= r[1] and r[2] <= k[2] and k[3] <= r[3]


# ------------------------------------------------------------------------------------------------ scheduler
class _Scheduler:
    """Two passes: (1) dependency edges from the byte spans in program order; (2) list scheduling by readiness
    (a heap of instructions whose predecessors are placed, earliest ready time first, ties in program order).
    Each compute engine's previous instruction is a predecessor (in-order queues); DMA transfers and port users
    take the earliest gap of their resources."""

    def __init__(self, instrs):
        self.instrs = instrs
        self.spaces = {}
        self.busy = dict.fromkeys(COMPUTE_QUEUES + DMA_QUEUES, 0.0)
        self.ports = {"sbuf_vg": _Busy(), "psum_vs": _Busy()}
        self.dmaq = {q: _Busy() for q in DMA_QUEUES}
        n = len(instrs)
        self.start, self.end, self.pred = [0.0] * n, [0.0] * n, [None] * n
        self.ops = [i.op for i in instrs]
        self.timeline = []
        self.assumptions = {}
        self.flops = 0

    # ---- pass 1: dependencies
    def _edges(self, idx, ins):
        """{predecessor index: latency ns} of instruction idx from its operands' spans (RAW, WAR, WAW)."""
        engine = ins.engine
        deps = {}
        for o in ins.operands:
            if o.span is None:
                raise ValueError(f"kernels.sim.cost: operand '{o.role}' of {ins.op} (instruction {idx}) has no "
                                 "byte span; the trace was recorded by an older kernels.sim (re-record it)")
            sp = self.spaces.get(o.space)
            if sp is None:
                continue
            r = _rect(o)
            if "r" in o.access:                                        # RAW
                for wr, (wi, we) in sp.writes.items():
                    if _overlap(r, wr):
                        lat = 0.0 if (engine == "dma" or we == engine == "tensor") else _LAT_NS.get(we, 0.0)
                        if deps.get(wi, -1.0) < lat:
                            deps[wi] = lat
            if "w" in o.access:                                        # WAR
                for rr, by_engine in sp.reads.items():
                    if _overlap(r, rr):
                        for lst in by_engine.values():
                            for ri in lst:
                                deps.setdefault(ri, 0.0)
                if not sp.hbm:                                         # WAW (not on HBM: see module doc)
                    for wr, (wi, _) in sp.writes.items():
                        if _overlap(r, wr):
                            deps.setdefault(wi, 0.0)
        deps.pop(idx, None)
        return deps

    def _record(self, idx, ins):
        engine = ins.engine
        for o in ins.operands:
            sp = self.spaces.get(o.space)
            if sp is None:
                sp = self.spaces[o.space] = _Space(o.buffer in _HBM)
            r = _rect(o)
            if "w" in o.access:
                for k in [k for k in sp.writes if _contains(r, k)]:
                    del sp.writes[k]
                if not sp.hbm:
                    for k in [k for k in sp.reads if _contains(r, k)]:
                        del sp.reads[k]
                sp.writes[r] = (idx, engine)
            if o.access == "r":
                by_engine = sp.reads.setdefault(r, {})
                lst = by_engine.get(engine)
                if lst is None or engine != "dma":
                    by_engine[engine] = [idx]      # compute engines run in order: the last reader ends last
                else:
                    lst.append(idx)                # DMA readers may finish in any order

    # ---- pass 2: placement
    def run(self):
        instrs = self.instrs
        n = len(instrs)
        succs = [[] for _ in range(n)]
        npred = [0] * n
        last_on = {}
        for idx, ins in enumerate(instrs):
            deps = self._edges(idx, ins)
            q = ins.engine if ins.engine in _HZ else ("dma" if ins.engine == "dma" else "sync")
            if q != "dma":
                prev = last_on.get(q)
                if prev is not None and prev not in deps:
                    deps[prev] = 0.0
                last_on[q] = idx
            for p, lat in deps.items():
                succs[p].append((idx, lat))
            npred[idx] = len(deps)
            self._record(idx, ins)
        ready = [0.0] * n
        heap = [(0.0, i) for i in range(n) if npred[i] == 0]
        heapq.heapify(heap)
        while heap:
            t, i = heapq.heappop(heap)
            self._place(i, instrs[i], t)
            e = self.end[i]
            for j, lat in succs[i]:
                tj = e + lat
                if tj > ready[j]:
                    ready[j] = tj
                    self.pred[j] = i
                npred[j] -= 1
                if npred[j] == 0:
                    heapq.heappush(heap, (ready[j], j))
        return self

    def _place(self, idx, ins, ready):
        engine = ins.engine
        if engine == "dma":
            self.start[idx] = ready
            end, who = self._place_dma(idx, ins, ready)
            self.end[idx] = end
            if who is not None:
                self.pred[idx] = who
            return
        q = engine if engine in _HZ else "sync"
        if q != engine:
            self.assumptions[f"{engine}.{ins.op}"] = "unknown engine, costed on the sync queue"
        cyc, note = _cycles(ins, q)
        if note:
            self.assumptions[f"{q}.{ins.op}"] = note
        dur = cyc / _HZ[q] * 1e9
        start = ready
        ports = _ports(ins, q)
        moved = True
        while moved and ports:
            moved = False
            for p in ports:
                s, w = self.ports[p].earliest(start, dur)
                if s > start:
                    start, moved = s, True
                    self.pred[idx] = w
        end = start + dur
        for p in ports:
            self.ports[p].add(start, end, idx)
        self.busy[q] += dur
        self.timeline.append((idx, q, start, end))
        self.start[idx], self.end[idx] = start, end
        if ins.op == "nc_matmul":
            r = {o.role: o for o in ins.operands}
            self.flops += 2 * r["stationary"].shape[0] * _free(r["stationary"]) * _free(r["moving"])

    def _place_dma(self, idx, ins, ready):
        """Place a transfer's packets on the k DMA queues with the earliest gaps; returns (end, blocking index)."""
        sb = [o.span[1] for o in ins.operands if o.buffer == "sbuf"]
        parts = max(sb) if sb else C.DMA_ENGINES * C.DMA_PARTITIONS_PER_ENGINE
        k = min(C.DMA_ENGINES, -(-parts // C.DMA_PARTITIONS_PER_ENGINE))
        nbytes = max(o.nbytes for o in ins.operands)
        hbm_ends = sum(1 for o in ins.operands if o.buffer in _HBM)
        t0 = ready + C.DMA_ISSUE_LATENCY_NS
        rate = C.DMA_ENGINE_BW
        if hbm_ends:
            busy = sum(1 for q in DMA_QUEUES if self.dmaq[q].busy_at(t0))
            rate = min(rate, C.HBM_BW / (min(C.DMA_ENGINES, k + busy) * hbm_ends))
        dur = C.DMA_PACKET_SETUP_NS + nbytes / k / rate * 1e9
        slots = sorted((self.dmaq[q].earliest(t0, dur) + (q,) for q in DMA_QUEUES), key=lambda x: (x[0], x[2]))[:k]
        end, who = 0.0, None
        for s, w, q in slots:
            e = s + dur
            self.dmaq[q].add(s, e, idx)
            self.busy[q] += dur
            self.timeline.append((idx, q, s, e))
            if e > end:
                end, who = e, (w if s > t0 else None)
        return end, who

    def report(self, instrs, target):
        n = len(self.end)
        total_ns = max(self.end) if n else 0.0
        self.timeline.sort(key=lambda e: (e[2], e[0]))
        busy_ns = dict(self.busy)
        busy_ns["dma"] = sum(self.busy[q] for q in DMA_QUEUES) / C.DMA_ENGINES
        us = {q: v / 1e3 for q, v in busy_ns.items()}
        pct = {q: (100.0 * v / total_ns if total_ns else 0.0) for q, v in busy_ns.items()}
        rd = sum(i.bytes_hbm_read for i in instrs)
        wr = sum(i.bytes_hbm_written for i in instrs)
        hbm_gbps = (rd + wr) / total_ns if total_ns else 0.0          # B/ns = GB/s
        hbm_pct = 100.0 * hbm_gbps * 1e9 / C.HBM_BW
        bound, rule = self._bound(pct, hbm_pct)
        path = self._critical_path()
        tl = [TimelineEntry(i, q, s / 1e3, e / 1e3, instrs[i].op, instrs[i].name, instrs[i].engine)
              for i, q, s, e in self.timeline]
        tu = {"active_pct": pct["tensor"],
              "flops_pct": (100.0 * self.flops / (total_ns * 1e-9 * C.TENSOR_PEAK_FLOPS) if total_ns else 0.0)}
        return CostReport(target=target, n_instructions=n, total_us=total_ns / 1e3, busy_us=us, busy_pct=pct,
                          critical_path=path, bound=bound, bound_rule=rule, tensor_util=tu, flops=self.flops,
                          hbm_bytes=(rd, wr), hbm_gbps=hbm_gbps, hbm_util_pct=hbm_pct,
                          start_us=[s / 1e3 for s in self.start], end_us=[e / 1e3 for e in self.end],
                          timeline=tl, assumptions=dict(self.assumptions), ops=self.ops)

    @staticmethod
    def _bound(pct, hbm_pct):
        cands = {q: pct[q] for q in ("tensor", "vector", "scalar", "gpsimd")}
        cands["dma"] = max(pct["dma"], hbm_pct)
        best = max(cands, key=cands.get)
        lim = 100 * C.BOUND_MIN_BUSY
        if cands[best] >= lim:
            return best, (f"{best} busy {cands[best]:.1f}% of the time, the highest of the engines and DMA "
                          f"(mean DMA queue occupancy or HBM utilisation), >= {lim:.0f}%")
        return "latency", (f"no engine or DMA is busy >= {lim:.0f}% of the time (highest: {best} "
                           f"{cands[best]:.1f}%): dependency latencies along the critical path set the time")

    def _critical_path(self):
        if not self.end:
            return []
        i = max(range(len(self.end)), key=self.end.__getitem__)
        path = []
        seen = set()
        while i is not None and i not in seen:
            seen.add(i)
            path.append(i)
            i = self.pred[i]
        return path[::-1]


def estimate(trace, target="trn1"):
    """Estimate the run time of an instruction trace on one NeuronCore-v2 (trn1). Returns a CostReport."""
    if target != "trn1":
        raise ValueError(f"kernels.sim.cost.estimate: target {target!r} is not modelled; only 'trn1' "
                         "(NeuronCore-v2) has documented cost formulas here")
    instrs = list(getattr(trace, "instructions", trace))
    return _Scheduler(instrs).run().report(instrs, target)
