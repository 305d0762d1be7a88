"""``nki.isa`` for the interpreter: the NKI >= 0.3 instruction set with dst-first signatures.

Each function checks the NeuronCore rules of the current target (``target.version()``: 2 = trn1 by default),
computes the result with numpy (fp32 inside Vector/Scalar/GpSimd, fp32 PSUM accumulation), writes ``dst`` with
round-to-nearest-even casts, and records one trace instruction. Semantics follow the official API docs
(awsdocs-neuron nki/api/generated/nki.isa.*.html); the relevant rule is named in each error.
"""
import enum

import numpy as np

from . import dtypes as _dt
from . import ops as _ops
from . import target
from .engines import (fail, onchip, no_psum, same_partitions, same_free, same_tiles, scalar_or_column, emit, store,
                      mm_flags, tensor as _tensor)
from .tensor import NkiTensor

_f32 = np.float32


# ---------------------------------------------------------------------------------------------------------- enums
class engine(enum.Enum):
    unknown = "unknown"
    tensor = "tensor"
    vector = "vector"
    scalar = "scalar"
    gpsimd = "gpsimd"
    sync = "sync"
    dma = "dma"


engine.activation = engine.scalar
engine.pe = engine.tensor
engine.act = engine.scalar
engine.pool = engine.gpsimd
# legacy (neuronxcc.nki.isa) engine constants, accepted for older kernel code
unknown_engine = engine.unknown
tensor_engine = engine.tensor
vector_engine = engine.vector
scalar_engine = engine.scalar
gpsimd_engine = engine.gpsimd


class reduce_cmd(enum.Enum):
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class oob_mode(enum.Enum):
    error = 0
    skip = 1


class dge_mode(enum.Enum):
    unknown = 0
    none = 1
    swdge = 2
    hwdge = 3


class matmul_perf_mode(enum.Enum):
    none = "none"
    double_row = "double_row"
    double_row_gen3 = "double_row_gen3"


class nc_version(enum.IntEnum):
    gen2 = 2
    gen3 = 3
    gen4 = 4


def get_nc_version():
    """The target NeuronCore version (``NEURON_PLATFORM_TARGET_OVERRIDE``, default trn1 = gen2)."""
    return nc_version(target.version())


def _engine_name(e, default):
    if e is None or e is engine.unknown or e == "unknown":
        return default
    if isinstance(e, engine):
        return e.value
    return str(e)


# ------------------------------------------------------------------------------------------ per-launch state
class _State:
    def __init__(self):
        self.act_regs = np.zeros(128, _f32)       # ScalarE reduce registers (activation)
        self.dve_regs = np.zeros(128, _f32)       # VectorE reduce registers (tensor_scalar_reduce)
        self.rng = np.random.Generator(np.random.PCG64(0))


_state = _State()


def _reset_state():
    global _state
    _state = _State()


# ---------------------------------------------------------------------------------------------------------- DMA
def dma_copy(dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
             name=None):
    """dst = src between HBM and SBUF (never PSUM since NKI 0.3). Element counts must match; when dtypes differ the
    value goes src -> fp32 -> dst (RNE); equal dtypes copy bits."""
    I = "dma_copy"
    _tensor(dst, I, "dst")
    _tensor(src, I, "src")
    for role, t in (("dst", dst), ("src", src)):
        if t._st.buffer == "psum":
            fail("dma.psum", I, role, "is in PSUM; dma_copy cannot access PSUM (copy to SBUF with tensor_copy "
                 "first)")
        if t._st.buffer == "sbuf":
            onchip(t, I, role, align=False)
    if dge_mode is not None and getattr(dge_mode, "name", "") == "hwdge":
        target.require(3, I, "dge_mode=hwdge")
        if dst.dtype != src.dtype:
            fail("dma.hwdge_dtype", I, "dst", "hwdge needs equal src/dst dtypes")
    if dst.size != src.size:
        fail("dma.count", I, "dst", f"has {dst.size} elements {list(dst.shape)} but src has {src.size} "
             f"{list(src.shape)}", src.size)
    if dst.dtype == src.dtype:
        v = src.np
        dst.np[...] = v if v.shape == dst.shape else v.reshape(dst.shape)
    else:
        v = src.read()
        dst.np[...] = _dt.cast(v if v.shape == dst.shape else v.reshape(dst.shape), dst.dtype)
    emit("dma", I, (("dst", dst), ("src", src)), name)


def dma_transpose(dst, src, axes=None, dge_mode=dge_mode.unknown, name=None):
    target.require(3, "dma_transpose")
    raise NotImplementedError("dma_transpose is not simulated (NeuronCore-v3+ only)")


# ---------------------------------------------------------------------------------------------- Tensor engine
def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              accumulate=None, tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None):
    """dst[M, N] (PSUM, fp32) = stationary[K, M].T @ moving[K, N], accumulated in fp32.

    accumulate: False overwrites; True adds to dst (error when a dst element was not last written by a matmul:
    hardware UB); None overwrites elements not yet written by a matmul since they were allocated (or last written
    by another instruction) and accumulates onto the others."""
    I = "nc_matmul"
    k, _, m = onchip(stationary, I, "stationary", ("sbuf",))
    k2, _, n = onchip(moving, I, "moving", ("sbuf",))
    mp, _, nd = onchip(dst, I, "dst", ("psum",))
    if k != k2:
        fail("matmul.contraction", I, "moving", f"partition (contraction) size {k2} differs from stationary's {k}", k)
    if m > 128:
        fail("matmul.stationary_free", I, "stationary", f"free size {m} exceeds 128", 128)
    if n > 512:
        fail("matmul.moving_free", I, "moving", f"free size {n} exceeds 512", 512)
    if mp != m or nd != n:
        fail("matmul.dst_shape", I, "dst", f"shape {list(dst.shape)} must be [{m}, {n}] (stationary free x moving "
             f"free)")
    v = target.version()
    if dst.dtype != _dt.float32 or _dt.is_tf32(dst.dtype):
        if v == 2 or dst.dtype != _dt.bfloat16:
            fail("matmul.dst_dtype", I, "dst", f"is {_dt.name(dst.dtype)}; nc_matmul dst dtype must be float32 on "
                 f"gen2" + ("" if v == 2 else " (bfloat16 allowed on gen3+)"), "float32")
    allowed = (_dt.float32, _dt.bfloat16, _dt.float16, _dt.float8_e4m3, _dt.float8_e5m2, _dt.float8_e4m3fn)
    for role, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in allowed:
            fail("matmul.dtype", I, role, f"dtype {_dt.name(t.dtype)} is not a matmul input type (fp8/bf16/fp16/"
                 f"tf32/fp32)")
    f32s = stationary.dtype == _dt.float32
    f32m = moving.dtype == _dt.float32
    if f32s != f32m:
        fail("matmul.fp32_pair", I, "moving" if f32s else "stationary", "fp32/tf32 operands must be paired (both "
             f"fp32/tf32): stationary {_dt.name(stationary.dtype)}, moving {_dt.name(moving.dtype)}")
    # dst must stay within one 2 KiB PSUM bank per partition
    st = dst._st
    isz = dst._flat.itemsize
    fs = st.free_size * st.flat.itemsize // isz
    lo = dst.offset % fs
    hi = lo + sum((c - 1) * s for c, s in zip(dst.shape[1:], dst.strides[1:]))
    if (lo * isz) // 2048 != (hi * isz + isz - 1) // 2048:
        fail("matmul.psum_bank", I, "dst", f"spans PSUM bytes {lo * isz}..{hi * isz + isz - 1} of each partition, "
             f"crossing a 2 KiB bank boundary", "one 2048-byte bank")
    if perf_mode is not None and perf_mode is not matmul_perf_mode.none and perf_mode != "none":
        target.require(3, I, "perf_mode")
    if tile_size:
        if v == 2 and (32 in tuple(tile_size)):
            fail("matmul.tile_size", I, "tile_size", f"{tile_size}: tiles of 32 are not supported on NeuronCore-v2",
                 "64 or 128")
    s = stationary.read().reshape(k, m)
    mv = moving.read().reshape(k, n)
    res = np.matmul(s.T, mv).reshape(dst.shape)
    flags = mm_flags(dst)
    out = dst.np
    if accumulate is True:
        if not flags.all():
            fail("matmul.accumulate", I, "dst", "accumulate=True into PSUM elements not written by a matmul "
                 "(uninitialised or written by another engine): undefined on hardware")
        out[...] = (out.astype(_f32) + res) if out.dtype != _f32 else out + res
    elif accumulate is False:
        out[...] = _dt.cast(res, dst.dtype)
    else:
        if flags.all():
            out[...] = _dt.cast(out.astype(_f32) + res, dst.dtype)
        elif not flags.any():
            out[...] = _dt.cast(res, dst.dtype)
        else:
            out[...] = _dt.cast(np.where(flags, out.astype(_f32) + res, res), dst.dtype)
    flags[...] = True
    emit("tensor", I, (("dst", dst), ("stationary", stationary), ("moving", moving)), name)


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """dst[F, P] = data[P, F] (free dims flattened). Tensor engine: data SBUF <= [128,128] -> dst PSUM (dst dtype
    equal to data's, or fp32 as official gen2 kernels use). Vector engine: <= [32,32], SBUF/PSUM."""
    I = "nc_transpose"
    _tensor(dst, I, "dst")
    _tensor(data, I, "data")
    eng = _engine_name(engine, "tensor" if (dst.buffer == "psum" and data.buffer == "sbuf") else "vector")
    if eng == "tensor":
        p, _, f = onchip(data, I, "data", ("sbuf",))
        pd, _, fd = onchip(dst, I, "dst", ("psum",))
        lim = 128
        if dst.dtype != data.dtype and dst.dtype != _dt.float32:
            fail("transpose.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's "
                 f"{_dt.name(data.dtype)} (or float32 PSUM)")
    elif eng == "vector":
        p, _, f = onchip(data, I, "data")
        pd, _, fd = onchip(dst, I, "dst")
        lim = 32
        if dst.dtype != data.dtype:
            fail("transpose.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    else:
        fail("engine", I, "engine", f"{eng} cannot transpose; use the tensor or vector engine")
    if p > lim or f > lim:
        fail("transpose.size", I, "data", f"is [{p}, {f}]; the {eng} engine transposes at most [{lim}, {lim}]",
             f"[{lim}, {lim}]")
    if pd != f or fd != p:
        fail("transpose.shape", I, "dst", f"shape {list(dst.shape)} must be [{f}, {p}]")
    if dst.dtype == data.dtype and eng == "vector":
        dst.np[...] = data.np.reshape(p, f).T.reshape(dst.shape)
        if dst._st.mm_written is not None:
            mm_flags(dst)[...] = False
    else:
        store(dst, data.read().reshape(p, f).T)   # a complete write: a later accumulate=None matmul overwrites it
    emit(eng, I, (("dst", dst), ("data", data)), name)


# ---------------------------------------------------------------------------------------------- Scalar engine
def _bias_scale(I, p, bias, scale):
    b = None
    if bias is not None:
        if isinstance(bias, NkiTensor):
            pb, _, nb = onchip(bias, I, "bias")
            if nb != 1:
                fail("activation.bias", I, "bias", f"is {list(bias.shape)}; must be a [P,1] tile", "[P,1]")
            same_partitions(I, "data", p, "bias", pb)
            if _dt.is_tf32(bias.dtype):
                fail("activation.bias", I, "bias", "dtype tfloat32 is not allowed")
            b = bias.read().reshape(pb, 1)
        else:
            if target.version() == 2:
                fail("activation.bias", I, "bias", f"is the scalar {bias!r}; on NeuronCore-v2 bias must be a [P,1] "
                     "tile", "[P,1] tile")
            b = float(bias)
    sc = scalar_or_column(scale, I, "scale", p)
    return b, sc


def _apply_reduce_regs(regs, pstart, p, cmd, red_op, partial, I, reduce_init=None):
    if cmd is None:
        cmd = reduce_cmd.idle
    if cmd in (reduce_cmd.reset, reduce_cmd.reset_reduce):
        init = 0.0 if reduce_init is None else float(reduce_init)
        if reduce_init is None and red_op is not None and red_op.identity is not None:
            init = red_op.identity if red_op.name != "add" else 0.0
        regs[pstart:pstart + p] = init
    if cmd in (reduce_cmd.reduce, reduce_cmd.reset_reduce):
        regs[pstart:pstart + p] = red_op.fn(regs[pstart:pstart + p], partial)
    elif cmd is reduce_cmd.load_reduce:
        fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by the interpreter")


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle,
               name=None):
    """dst = op(data * scale + bias) in fp32 on the Scalar engine, with the optional free-axis reduction into the
    engine's 128 fp32 reduce registers (reduce_cmd idle/reset/reduce/reset_reduce); reduce_res [P,1] reads them
    out."""
    I = "activation"
    return _activation(I, dst, op, data, bias, scale, reduce_op, reduce_res, reduce_cmd, name)


def _activation(I, dst, op, data, bias, scale, reduce_op, reduce_res, cmd, name):
    fn = _ops.unary(op, I)
    p, pstart, n = same_tiles(I, ("data", data), ("dst", dst))
    b, sc = _bias_scale(I, p, bias, scale)
    if fn.name == "reciprocal" and bias is not None and target.version() == 2:
        fail("activation.bias", I, "bias", "activation(op=reciprocal) does not support bias on NeuronCore-v2")
    if cmd is None:
        cmd = reduce_cmd.idle
    red = None
    uses_reduce = cmd in (reduce_cmd.reduce, reduce_cmd.reset_reduce)
    if uses_reduce or reduce_op is not None:
        if reduce_op is None:
            fail("activation.reduce_op", I, "reduce_op", f"is required with reduce_cmd={cmd.name}")
        red = _ops.binary(reduce_op, I, "reduce_op")
        if red.name != "add" and target.version() == 2:
            fail("activation.reduce_op", I, "reduce_op", f"is {red.name}; only add is supported on NeuronCore-v2",
                 "add")
    if cmd is reduce_cmd.load_reduce:
        fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by activation in the interpreter")
    if reduce_res is not None:
        pr, _, nr = onchip(reduce_res, I, "reduce_res")
        same_partitions(I, "data", p, "reduce_res", pr)
        if nr != 1:
            fail("activation.reduce_res", I, "reduce_res", f"is {list(reduce_res.shape)}; must be [P,1]", "[P,1]")
    x = data.read()
    if x.ndim != 2:
        x = x.reshape(p, n)
    if sc != 1.0 if isinstance(sc, float) else True:
        x = x * sc
    if b is not None:
        x = x + b
    y = fn.unary(x)
    store(dst, y)
    partial = red.reduce(y, -1) if (uses_reduce and red is not None) else None
    _apply_reduce_regs(_state.act_regs, pstart, p, cmd, red, partial, I)
    if reduce_res is not None:
        store(reduce_res, _state.act_regs[pstart:pstart + p].reshape(p, 1))
    emit("scalar", I, (("dst", dst), ("data", data), ("bias", bias if isinstance(bias, NkiTensor) else None),
                       ("scale", scale if isinstance(scale, NkiTensor) else None), ("reduce_res", reduce_res)), name)


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """activation with reduce_cmd=reset_reduce and read-out into reduce_res [P,1]."""
    return _activation("activation_reduce", dst, op, data, bias, scale, reduce_op, reduce_res,
                       reduce_cmd.reset_reduce, name)


# ---------------------------------------------------------------------------------------------- Vector engine
def _int_values(t):
    return t.np.astype(np.int64)


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = data1 <op> data2 elementwise (no broadcasting). fp32 on the Vector engine; power and all-integer
    (int32/uint32) operations run on GpSimd with exact integer math (SBUF only)."""
    I = "tensor_tensor"
    opd = _ops.binary(op, I)
    same_tiles(I, ("data1", data1), ("data2", data2), ("dst", dst))
    if data1._st.buffer == "psum" and data2._st.buffer == "psum":
        fail("tensor_tensor.psum", I, "data2", "and data1 are both in PSUM; at most one input may be in PSUM")
    ints = data1.dtype.kind in "iu" and data2.dtype.kind in "iu" and dst.dtype.kind in "iu"
    int32ish = ints and (data1.dtype.itemsize == 4 or data2.dtype.itemsize == 4 or dst.dtype.itemsize == 4)
    default = "gpsimd" if (opd.name == "power" or int32ish) else "vector"
    eng = _engine_name(engine, default)
    if eng not in ("vector", "gpsimd"):
        fail("engine", I, "engine", f"{eng}: tensor_tensor runs on the Vector or GpSimd engine")
    if eng == "gpsimd":
        for role, t in (("dst", dst), ("data1", data1), ("data2", data2)):
            no_psum(t, I, role, "GpSimd")
    if opd.kind == "bitvec" or (eng == "gpsimd" and ints):
        if not ints:
            fail("op.bitvec", I, "data1", f"bitwise op {opd.name} needs integer operands, got "
                 f"{_dt.name(data1.dtype)}/{_dt.name(data2.dtype)} -> {_dt.name(dst.dtype)}")
        a = _int_values(data1)
        b = _int_values(data2)
        if b.shape != a.shape:
            b = b.reshape(a.shape)
        with np.errstate(all="ignore"):
            r = opd.fn(a, b)
        r = np.asarray(r)
        if r.dtype.kind == "f":
            store(dst, r)
        else:
            dst.np[...] = r.reshape(dst.shape).astype(dst.dtype)   # two's-complement wrap like integer ALUs
            if dst._st.mm_written is not None:
                mm_flags(dst)[...] = False
    else:
        a = data1.read()
        b = data2.read()
        if b.shape != a.shape:
            b = b.reshape(a.shape)
        with np.errstate(all="ignore"):
            store(dst, opd.fn(a, b))
    emit(eng, I, (("dst", dst), ("data1", data1), ("data2", data2)), name)


def _scalar_op(opd, x, operand, reverse):
    with np.errstate(all="ignore"):
        if opd.kind == "bitvec":
            o = operand.astype(np.int64) if isinstance(operand, np.ndarray) else int(operand)
            return opd.fn(o, x) if reverse else opd.fn(x, o)
        o = operand if isinstance(operand, np.ndarray) else _f32(operand)
        return opd.fn(o, x) if reverse else opd.fn(x, o)


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data <op0> operand0) <op1> operand1 with operands Python scalars or [P,1] fp32 tiles broadcast along
    the free dims (reverse swaps the operand order). Both ops arithmetic or both bitvec."""
    I = "tensor_scalar"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1") if op1 is not None else None
    p, _, n = same_tiles(I, ("data", data), ("dst", dst))
    bit0 = o0.kind == "bitvec"
    if o1 is not None and (o1.kind == "bitvec") != bit0:
        fail("tensor_scalar.op_class", I, "op1", f"{o1.name} and op0 {o0.name} must both be arithmetic or both "
             "bitvec")
    eng = _engine_name(engine, "vector")
    if bit0 and eng != "vector":
        fail("engine", I, "engine", f"{eng}: bitvec operators run on the Vector engine only", "vector")
    if eng == "gpsimd":
        no_psum(data, I, "data", "GpSimd")
        no_psum(dst, I, "dst", "GpSimd")
    elif eng == "scalar":
        pair = (o0.name, o1.name if o1 else None)
        if pair not in (("multiply", "add"), ("multiply", None), ("add", None)):
            fail("engine", I, "engine", f"the Scalar engine supports only (multiply, add), (multiply,), (add,); got "
                 f"{pair}")
    elif eng != "vector":
        fail("engine", I, "engine", f"{eng} cannot run tensor_scalar")
    v0 = scalar_or_column(operand0, I, "operand0", p, fp32_tile=not bit0)
    v1 = scalar_or_column(operand1, I, "operand1", p, fp32_tile=not bit0) if o1 is not None else None
    if bit0:
        if data.dtype.kind not in "iu" or dst.dtype.kind not in "iu":
            fail("op.bitvec", I, "data", f"bitvec op {o0.name} needs integer data/dst, got "
                 f"{_dt.name(data.dtype)} -> {_dt.name(dst.dtype)}")
        x = _int_values(data).reshape(p, n)
    else:
        x = data.read()
        if x.ndim != 2:
            x = x.reshape(p, n)
    y = _scalar_op(o0, x, v0, reverse0)
    if o1 is not None:
        y = _scalar_op(o1, y, v1, reverse1)
    if bit0:
        dst.np[...] = y.reshape(dst.shape).astype(dst.dtype)
    else:
        store(dst, y)
    emit(eng, I, (("dst", dst), ("data", data),
                  ("operand0", operand0 if isinstance(operand0, NkiTensor) else None),
                  ("operand1", operand1 if isinstance(operand1, NkiTensor) else None)), name)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """dst = (data <op0> operand0) <op1> operand1; operand0 a scalar or [P,1] tile, operand1 a full tile."""
    I = "scalar_tensor_tensor"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1")
    p, _, n = same_tiles(I, ("data", data), ("dst", dst), ("operand1", operand1))
    if data._st.buffer == "psum" and operand1._st.buffer == "psum":
        fail("scalar_tensor_tensor.psum", I, "operand1", "and data are both in PSUM; at most one may be")
    if o0.kind == "bitvec" or o1.kind == "bitvec":
        fail("op.bitvec", I, "op0", "bitvec ops are not supported by scalar_tensor_tensor in the interpreter")
    v0 = scalar_or_column(operand0, I, "operand0", p, fp32_tile=False)   # dtype not restricted by the docs
    x = data.read().reshape(p, n)
    y = _scalar_op(o0, x, v0, reverse0)
    t = operand1.read().reshape(p, n)
    with np.errstate(all="ignore"):
        y = o1.fn(t, y) if reverse1 else o1.fn(y, t)
    store(dst, y)
    emit("vector", I, (("dst", dst), ("data", data), ("operand0", operand0 if isinstance(operand0, NkiTensor)
                                                                     else None), ("operand1", operand1)), name)


def _reduce_axes(I, data, axis):
    if isinstance(axis, (list, tuple)):
        axes = sorted(int(a) % data.ndim for a in axis)
    else:
        axes = [int(axis) % data.ndim]
    if not axes or axes[0] == 0:
        fail("reduce.axis", I, "axis", f"{axis} includes the partition dim 0; reductions run along free dims only")
    if axes != list(range(axes[0], data.ndim)):
        fail("reduce.axis", I, "axis", f"{axis} must be the last contiguous free dims of {list(data.shape)} "
             f"(e.g. ({data.ndim - 1},) or ({data.ndim - 2}, {data.ndim - 1}))")
    return axes


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """dst = reduce_op over the trailing free ``axis`` dims of data (fp32); negate multiplies by -1."""
    I = "tensor_reduce"
    opd = _ops.binary(op, I)
    if opd.reduce is None:
        fail("reduce.op", I, "op", f"{opd.name} is not a legal reduction (add, subtract, multiply, maximum, minimum, "
             "bitwise/logical and/or/xor)")
    p, _, n = onchip(data, I, "data")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "data", p, "dst", pd)
    axes = _reduce_axes(I, data, axis)
    kept = 1
    for a in range(1, axes[0]):
        kept *= data.shape[a]
    same_free(I, "reduced data", kept, "dst", nd)
    r = 1
    for a in axes:
        r *= data.shape[a]
    if opd.kind == "bitvec":
        x = _int_values(data).reshape(p, kept, r)
        y = opd.reduce(x, -1)
        if negate:
            y = -y
        dst.np[...] = y.reshape(dst.shape).astype(dst.dtype)
    else:
        x = data.read().reshape(p, kept, r)
        with np.errstate(all="ignore"):
            y = opd.reduce(x, -1)
        if negate:
            y = -y
        store(dst, y)
    emit("vector", I, (("dst", dst), ("data", data)), name)


def tensor_scalar_reduce(dst, data, op0, operand0, reduce_op, reduce_res=None, reverse0=False,
                         reduce_cmd=reduce_cmd.reset_reduce, reduce_init=None, reduce_res_negate=False, name=None):
    """dst = data <op0> operand0 (one arithmetic op), plus a reduction (add/subtract/multiply/max/min) over all
    free dims. reduce_cmd drives the Vector engine's 128 accumulator registers: reset_reduce (default) resets them
    to the op's identity (0 for add/subtract, 1 for multiply, -inf/+inf for max/min) then accumulates, reduce keeps
    accumulating, load_reduce loads ``reduce_init`` (scalar or [P,1]) then accumulates, reset only resets; reduce_res
    [P,1] receives the registers (negated if reduce_res_negate). With idle, reduce_res receives this instruction's
    reduction alone."""
    I = "tensor_scalar_reduce"
    o0 = _ops.binary(op0, I, "op0")
    if o0.kind == "bitvec":
        fail("op.bitvec", I, "op0", f"{o0.name}: tensor_scalar_reduce takes an arithmetic op only")
    red = _ops.binary(reduce_op, I, "reduce_op")
    if red.name not in ("add", "subtract", "multiply", "maximum", "minimum"):
        fail("reduce.op", I, "reduce_op", f"{red.name} is not add/subtract/multiply/maximum/minimum")
    p, pstart, n = same_tiles(I, ("data", data), ("dst", dst))
    v0 = scalar_or_column(operand0, I, "operand0", p)
    if reduce_res is not None:
        pr, _, nr = onchip(reduce_res, I, "reduce_res")
        same_partitions(I, "data", p, "reduce_res", pr)
        if nr != 1:
            fail("reduce_res.shape", I, "reduce_res", f"is {list(reduce_res.shape)}; must be [P,1]", "[P,1]")
    if reduce_cmd is not None and reduce_cmd.name == "load_reduce" and reduce_init is None:
        fail("reduce_init", I, "reduce_init", "is required with reduce_cmd=load_reduce")
    x = data.read().reshape(p, n)
    y = np.asarray(_scalar_op(o0, x, v0, reverse0), _f32)
    store(dst, y)
    cmd = reduce_cmd if reduce_cmd is not None else globals()["reduce_cmd"].idle
    rc = type(cmd)
    with np.errstate(all="ignore"):
        partial = red.reduce(y, -1)
    regs = _state.dve_regs
    if cmd is rc.idle:
        out = partial.reshape(p, 1)
    else:
        if cmd in (rc.reset, rc.reset_reduce):
            regs[pstart:pstart + p] = 1.0 if red.name == "multiply" else (red.identity or 0.0)
        elif cmd is rc.load_reduce:
            if reduce_init is None:
                fail("reduce_init", I, "reduce_init", "is required with reduce_cmd=load_reduce")
            iv = scalar_or_column(reduce_init, I, "reduce_init", p)
            regs[pstart:pstart + p] = iv.reshape(-1) if isinstance(iv, np.ndarray) else iv
        if cmd in (rc.reduce, rc.reset_reduce, rc.load_reduce):
            with np.errstate(all="ignore"):
                if red.name == "subtract":
                    regs[pstart:pstart + p] = regs[pstart:pstart + p] - np.sum(y, axis=-1, dtype=_f32)
                else:
                    regs[pstart:pstart + p] = red.fn(regs[pstart:pstart + p], partial)
        out = regs[pstart:pstart + p].reshape(p, 1)
    if reduce_res is not None:
        store(reduce_res, -out if reduce_res_negate else out)
    emit("vector", I, (("dst", dst), ("data", data), ("reduce_res", reduce_res)), name)


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """dst = src; bit-exact when dtypes are equal, else via fp32 with RNE. Not on the Scalar engine on v2; the
    GpSimd engine cannot access PSUM."""
    I = "tensor_copy"
    p, _, n = same_tiles(I, ("src", src), ("dst", dst))
    eng = _engine_name(engine, "vector")
    if eng == "scalar" and target.version() == 2:
        fail("engine", I, "engine", "tensor_copy is not supported on the Scalar engine on NeuronCore-v2 (use "
             "activation(op=nl.copy))")
    if eng == "gpsimd":
        no_psum(src, I, "src", "GpSimd")
        no_psum(dst, I, "dst", "GpSimd")
    if eng not in ("vector", "gpsimd", "scalar"):
        fail("engine", I, "engine", f"{eng} cannot run tensor_copy")
    if src.dtype == dst.dtype:
        v = src.np
        dst.np[...] = v if v.shape == dst.shape else v.reshape(dst.shape)
        if dst._st.mm_written is not None:
            mm_flags(dst)[...] = False
    else:
        store(dst, src.read())
    emit(eng, I, (("dst", dst), ("src", src)), name)


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill dst with a compile-time constant whose type matches dst's dtype (an int for integer tensors)."""
    I = "memset"
    onchip(dst, I, "dst")
    eng = _engine_name(engine, "vector")
    if eng == "gpsimd":
        no_psum(dst, I, "dst", "GpSimd")
    if isinstance(value, NkiTensor) or not isinstance(value, (bool, int, float, np.integer, np.floating)):
        fail("memset.value", I, "value", f"must be a Python number, got {type(value).__name__}")
    if dst.dtype.kind in "iu" and not isinstance(value, (bool, int, np.integer)):
        fail("memset.value", I, "value", f"{value!r} is a float but dst is {_dt.name(dst.dtype)}; use an int literal")
    if dst.dtype.kind in "iub":
        info = np.iinfo(dst.dtype) if dst.dtype.kind != "b" else None
        if info is not None and not info.min <= int(value) <= info.max:
            fail("memset.value", I, "value", f"{value} does not fit {_dt.name(dst.dtype)}")
        dst.np[...] = value
    else:
        dst.np[...] = _dt.cast(np.array(value, dtype=_f32), dst.dtype)
    if dst._st.mm_written is not None:
        mm_flags(dst)[...] = False
    emit(eng, I, (("dst", dst),), name)


def reciprocal(dst, data, name=None):
    """dst = 1 / data on the Vector engine (fp32)."""
    I = "reciprocal"
    p, _, n = same_tiles(I, ("data", data), ("dst", dst))
    with np.errstate(all="ignore"):
        store(dst, _f32(1.0) / data.read().reshape(p, n))
    emit("vector", I, (("dst", dst), ("data", data)), name)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """res[:,0] = op1(op0(data0[:,0], initial), data1[:,0]); res[:,i] = op1(op0(data0[:,i], res[:,i-1]), data1[:,i])."""
    I = "tensor_tensor_scan"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1")
    p, _, n = same_tiles(I, ("data0", data0), ("data1", data1), ("dst", dst))
    init = scalar_or_column(initial, I, "initial", p)
    a = data0.read().reshape(p, n)
    b = data1.read().reshape(p, n)
    out = np.empty((p, n), _f32)
    prev = np.broadcast_to(np.asarray(init, _f32).reshape(-1), (p,)) if isinstance(init, np.ndarray) else \
        np.full(p, init, _f32)
    with np.errstate(all="ignore"):
        for i in range(n):
            t = o0.fn(prev, a[:, i]) if reverse0 else o0.fn(a[:, i], prev)
            prev = o1.fn(b[:, i], t) if reverse1 else o1.fn(t, b[:, i])
            out[:, i] = prev
    store(dst, out)
    emit("vector", I, (("dst", dst), ("data0", data0), ("data1", data1)), name)


def bn_stats(dst, data, name=None):
    """6 values per partition: (count, mean, variance*count) of the even then of the odd free elements (fp32);
    data has at most 512 elements per partition."""
    I = "bn_stats"
    p, _, n = onchip(data, I, "data")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "data", p, "dst", pd)
    if n > 512:
        fail("bn_stats.fmax", I, "data", f"has {n} elements per partition", 512)
    if nd != 6:
        fail("bn_stats.dst", I, "dst", f"has {nd} elements per partition; must be 6", 6)
    x = data.read().reshape(p, n)
    out = np.zeros((p, 6), _f32)
    for j, part in enumerate((x[:, 0::2], x[:, 1::2])):
        c = part.shape[1]
        out[:, 3 * j] = c
        if c:
            m = part.mean(axis=1, dtype=_f32)
            out[:, 3 * j + 1] = m
            out[:, 3 * j + 2] = np.sum((part - m[:, None]) ** 2, axis=1, dtype=_f32)
    store(dst, out)
    emit("vector", I, (("dst", dst), ("data", data)), name)


def bn_aggr(dst, data, name=None):
    """Aggregate (count, mean, variance*count) triples into (mean, variance) per partition (fp32)."""
    I = "bn_aggr"
    p, _, n = onchip(data, I, "data")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "data", p, "dst", pd)
    if n % 3:
        fail("bn_aggr.data", I, "data", f"has {n} elements per partition; must be a multiple of 3")
    if nd != 2:
        fail("bn_aggr.dst", I, "dst", f"has {nd} elements per partition; must be 2 (mean, variance)", 2)
    t = data.read().reshape(p, n // 3, 3)
    c, m, m2 = t[..., 0], t[..., 1], t[..., 2]
    total = c.sum(axis=1, dtype=_f32)
    with np.errstate(all="ignore"):
        mean = np.where(total > 0, (c * np.where(c > 0, m, 0)).sum(axis=1, dtype=_f32) / total, 0).astype(_f32)
        dev = np.where(c > 0, c * (m - mean[:, None]) ** 2 + m2, 0)
        var = np.where(total > 0, dev.sum(axis=1, dtype=_f32) / total, 0).astype(_f32)
    store(dst, np.stack([mean, var], axis=1))
    emit("vector", I, (("dst", dst), ("data", data)), name)


def max8(dst, src, name=None):
    """The 8 largest values of each partition of src, in descending order, into dst [P, 8] (Vector engine)."""
    I = "max8"
    p, _, n = onchip(src, I, "src")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "src", p, "dst", pd)
    if nd != 8:
        fail("max8.dst", I, "dst", f"has {nd} elements per partition; must be 8", 8)
    if n < 8 or n > 16384:
        fail("max8.src", I, "src", f"has {n} elements per partition; must be 8..16384", "8..16384")
    x = src.read().reshape(p, n)
    store(dst, -np.sort(-x, axis=1)[:, :8])
    emit("vector", I, (("dst", dst), ("src", src)), name)


def select_reduce(dst, predicate, on_true, on_false, reduce_res=None, reduce_cmd=reduce_cmd.idle, reduce_op=None,
                  reverse_pred=False, name=None):
    """dst = where(predicate != 0, on_true, on_false) (predicate inverted by reverse_pred) on the Vector engine, with
    an optional row max into reduce_res [P,1]: idle gives this instruction's row max; reset/reset_reduce/reduce drive
    the Vector accumulator registers (reset to -inf). on_false: fp32 scalar or [P,1] tile; predicate int8/uint8/
    int16/uint16; on_true and predicate not both in PSUM; on_true not tfloat32/int32/uint32."""
    I = "select_reduce"
    p, pstart, n = same_tiles(I, ("on_true", on_true), ("predicate", predicate), ("dst", dst))
    if on_true._st.buffer == "psum" and predicate._st.buffer == "psum":
        fail("select_reduce.psum", I, "predicate", "and on_true are both in PSUM; at most one may be")
    if predicate.dtype not in (_dt.int8, _dt.uint8, _dt.int16, _dt.uint16):
        fail("select_reduce.dtype", I, "predicate", f"is {_dt.name(predicate.dtype)}; must be int8/uint8/int16/uint16")
    if _dt.is_tf32(on_true.dtype) or on_true.dtype in (_dt.int32, _dt.uint32):
        fail("select_reduce.dtype", I, "on_true", f"is {_dt.name(on_true.dtype)}; tfloat32/int32/uint32 not allowed")
    red = _ops.binary(reduce_op if reduce_op is not None else _ops.BINARY["maximum"], I, "reduce_op")
    if red.name != "maximum":
        fail("select_reduce.reduce_op", I, "reduce_op", f"is {red.name}; only maximum is supported", "maximum")
    fv = scalar_or_column(on_false, I, "on_false", p)
    if reduce_res is not None:
        pr, _, nr = onchip(reduce_res, I, "reduce_res")
        same_partitions(I, "on_true", p, "reduce_res", pr)
        if nr != 1 or not _dt.is_float(reduce_res.dtype):
            fail("select_reduce.reduce_res", I, "reduce_res", f"is {list(reduce_res.shape)} "
                 f"{_dt.name(reduce_res.dtype)}; must be a float [P,1] tile", "[P,1]")
    cmd = reduce_cmd if reduce_cmd is not None else globals()["reduce_cmd"].idle
    rc = type(cmd)
    if cmd is rc.load_reduce:
        fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by select_reduce")
    pred = predicate.np.reshape(p, n) != 0
    if reverse_pred:
        pred = ~pred
    y = np.where(pred, on_true.read().reshape(p, n), fv if isinstance(fv, float) else fv.reshape(p, 1)).astype(_f32)
    store(dst, y)
    row = np.max(y, axis=1)
    regs = _state.dve_regs
    if cmd is rc.idle:
        out = row.reshape(p, 1)
    else:
        if cmd in (rc.reset, rc.reset_reduce):
            regs[pstart:pstart + p] = -np.inf
        if cmd in (rc.reduce, rc.reset_reduce):
            regs[pstart:pstart + p] = np.maximum(regs[pstart:pstart + p], row)
        out = regs[pstart:pstart + p].reshape(p, 1)
    if reduce_res is not None:
        store(reduce_res, out)
    emit("vector", I, (("dst", dst), ("predicate", predicate), ("on_true", on_true),
                       ("on_false", on_false if isinstance(on_false, NkiTensor) else None),
                       ("reduce_res", reduce_res)), name)


def nc_find_index8(*args, **kwargs):
    raise NotImplementedError("nisa.nc_find_index8 is not simulated by kernels.sim")


def nc_match_replace8(*args, **kwargs):
    raise NotImplementedError("nisa.nc_match_replace8 is not simulated by kernels.sim")


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):
    """Within each 32-partition quadrant, dst partition i takes src partition shuffle_mask[i] (255 keeps dst)."""
    I = "nc_stream_shuffle"
    p, _, n = onchip(src, I, "src")
    pd, _, nd = onchip(dst, I, "dst")
    same_free(I, "src", n, "dst", nd)
    mask = list(shuffle_mask)
    if len(mask) != 32:
        fail("shuffle.mask", I, "shuffle_mask", f"has {len(mask)} entries", 32)
    x = src.read().reshape(p, n)
    out = dst.read().reshape(pd, n).copy()
    for q in range(0, pd, 32):
        for i, s in enumerate(mask):
            if s != 255 and q + i < pd and q + s < p:
                out[q + i] = x[q + s]
    store(dst, out)
    emit("vector", I, (("dst", dst), ("src", src)), name)


# ---------------------------------------------------------------------------------------------- GpSimd engine
def _affine_values(I, pattern, offset, channel_multiplier, p, n):
    pat = [(int(s), int(c)) for s, c in pattern]
    if len(pat) > 4:
        fail("pattern.dims", I, "pattern", f"has {len(pat)} dims", 4)
    cnt = 1
    for _, c in pat:
        cnt *= c
    if cnt != n:
        fail("pattern.count", I, "pattern", f"{pat} covers {cnt} elements but dst has {n} per partition", n)
    v = np.full((p,) + tuple(c for _, c in pat), 0, np.int64)
    v += int(offset) + np.arange(p, dtype=np.int64).reshape((p,) + (1,) * len(pat)) * int(channel_multiplier)
    for k, (s, c) in enumerate(pat):
        shp = [1] * (len(pat) + 1)
        shp[k + 1] = c
        v += np.arange(c, dtype=np.int64).reshape(shp) * s
    return v.reshape(p, n)


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """dst[c, w, z, y, x] = offset + c*channel_multiplier + w*sw + z*sz + y*sy + x*sx for the pattern
    [[sw, nw], [sz, nz], [sy, ny], [sx, nx]] (int32 math, cast to dst dtype); GpSimd, dst in SBUF. ``c`` counts
    the partitions of dst from 0 (``for channel_id in range(dst.shape[0])`` in the nki.isa.iota docs)."""
    I = "iota"
    p, _, n = onchip(dst, I, "dst", ("sbuf",))
    v = _affine_values(I, pattern, offset, channel_multiplier, p, n)
    v = v.astype(np.int32)
    if dst.dtype.kind in "iu":
        dst.np[...] = v.reshape(dst.shape).astype(dst.dtype)
    else:
        store(dst, v.astype(_f32))
    emit("gpsimd", I, (("dst", dst),), name)


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=None, offset=0,
                  name=None):
    """dst = on_true_tile where cmp_op(a, 0) else on_false_value, a = offset + c*channel_multiplier +
    sum(index*stride over pattern) (as iota). GpSimd: dst and on_true_tile in SBUF."""
    I = "affine_select"
    cmp = _ops.binary(cmp_op if cmp_op is not None else _ops.BINARY["equal"], I, "cmp_op")
    p, _, n = same_tiles(I, ("dst", dst), ("on_true_tile", on_true_tile), allowed=("sbuf",))
    if isinstance(on_false_value, NkiTensor) or not isinstance(on_false_value, (int, float, np.floating,
                                                                                  np.integer)):
        fail("affine_select.on_false_value", I, "on_false_value", "must be an fp32 scalar")
    a = _affine_values(I, pattern, offset, channel_multiplier, p, n)
    pred = cmp.fn(a.astype(np.float64), 0.0) != 0
    if dst.dtype == on_true_tile.dtype:
        src = on_true_tile.np.reshape(p, n)
        fv = _dt.cast(np.array([on_false_value], _f32), dst.dtype)[0]
        dst.np[...] = np.where(pred, src, fv).reshape(dst.shape)
    else:
        store(dst, np.where(pred, on_true_tile.read().reshape(p, n), _f32(on_false_value)))
    emit("gpsimd", I, (("dst", dst), ("on_true_tile", on_true_tile)), name)


def tensor_partition_reduce(dst, op, data, name=None):
    """Reduce across partitions on GpSimd: dst[1, F] = op over data's partitions (add, maximum, minimum, ...)."""
    I = "tensor_partition_reduce"
    opd = _ops.binary(op, I)
    p, _, n = onchip(data, I, "data", ("sbuf",))
    pd, _, nd = onchip(dst, I, "dst", ("sbuf",))
    same_free(I, "data", n, "dst", nd)
    if opd.reduce is None:
        fail("reduce.op", I, "op", f"{opd.name} is not a reduction")
    x = data.read().reshape(p, n).T
    store(dst, np.broadcast_to(opd.reduce(x, -1).reshape(1, n), (pd, n)))
    emit("gpsimd", I, (("dst", dst), ("data", data)), name)


# ------------------------------------------------------------------------------------------------------ random
def rng(dst, engine=engine.vector, name=None):
    """32 random bits per element truncated to dst's integer dtype. Vector engine only on NeuronCore-v2. The
    interpreter's PRNG (numpy PCG64) does not reproduce hardware bit streams."""
    I = "rng"
    onchip(dst, I, "dst")
    eng = _engine_name(engine, "vector")
    if eng != "vector" and target.version() == 2:
        fail("engine", I, "engine", f"{eng}: rng runs on the Vector engine only on NeuronCore-v2", "vector")
    if dst.dtype.kind not in "iu" or dst.dtype.itemsize > 4:
        fail("rng.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must be an integer type (int8..uint32)")
    bits = _state.rng.integers(0, 2 ** 32, size=dst.shape, dtype=np.uint64).astype(np.uint32)
    dst.np[...] = bits.astype(dst.dtype)   # truncation of the 32-bit value
    emit(eng, I, (("dst", dst),), name)


def set_rng_seed(src_seeds, name=None):
    """Seed the Vector engine PRNG from a [1,1] 32-bit tensor."""
    I = "set_rng_seed"
    onchip(src_seeds, I, "src_seeds", align=False)
    if src_seeds.size != 1 or src_seeds.dtype.itemsize != 4:
        fail("rng.seed", I, "src_seeds", f"is {list(src_seeds.shape)} {_dt.name(src_seeds.dtype)}; must be a [1,1] "
             "32-bit tensor", "[1,1]")
    seed = int(src_seeds.np.reshape(-1).view(np.uint32)[0]) if src_seeds.dtype.kind != "f" else \
        int(src_seeds.np.reshape(-1).view(np.uint32)[0])
    _state.rng = np.random.Generator(np.random.PCG64(seed))
    emit("vector", I, (("src_seeds", src_seeds),), name)


def dropout(dst, data, prob, name=None):
    """dst = data with each element zeroed with probability prob (scalar or [P,1]); no rescaling."""
    I = "dropout"
    p, _, n = same_tiles(I, ("data", data), ("dst", dst))
    if dst.dtype != data.dtype:
        fail("dropout.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    pr = scalar_or_column(prob, I, "prob", p)
    u = _state.rng.random((p, n), dtype=_f32)
    keep = u >= (pr if isinstance(pr, float) else pr.reshape(p, 1))
    src = data.np.reshape(p, n)
    dst.np[...] = np.where(keep, src, np.zeros((), src.dtype)).reshape(dst.shape)
    if dst._st.mm_written is not None:
        mm_flags(dst)[...] = False
    emit("vector", I, (("dst", dst), ("data", data)), name)


def _newer_core_only(name, generation):
    """An instruction of NeuronCore-v{generation}+: refused on older targets, not simulated on newer ones."""
    def instruction(*args, **kwargs):
        target.require(generation, name)
        raise NotImplementedError(f"{name} is not simulated (NeuronCore-v{generation}+ only)")
    instruction.__name__ = instruction.__qualname__ = name
    return instruction


activate2 = _newer_core_only("activate2", 4)
exponential = _newer_core_only("exponential", 4)
nc_matmul_mx = _newer_core_only("nc_matmul_mx", 4)
quantize_mx = _newer_core_only("quantize_mx", 4)
rand2 = _newer_core_only("rand2", 4)
range_select = _newer_core_only("range_select", 3)
rand_get_state = _newer_core_only("rand_get_state", 3)
rand_set_state = _newer_core_only("rand_set_state", 3)
