"""``nki.isa`` for the interpreter: the NKI >= 0.3 instruction set with dst-first signatures.

Each function checks the NeuronCore rules of the current target (``target.version()``: 2 = trn1 by default),
computes the result with numpy (fp32 inside Vector/Scalar/GpSimd, fp32 PSUM accumulation), writes ``dst`` with
round-to-nearest-even casts, and records one trace instruction. Semantics follow the official API docs
(awsdocs-neuron nki/api/generated/nki.isa.*.html); the relevant rule is named in each error.
"""
import enum as _enum
import functools as _functools

import numpy as _np

from . import dtypes as _dt
from . import ops as _ops
from . import target as _target
from .engines import (fail as _fail, onchip as _chk, no_psum as _no_psum, same_partitions as _same_p,
                      same_free as _same_f, same_tiles as _tiles, scalar_or_column as _scalar_or_col, emit as _emit,
                      store as _store, mm_flags as _mm_flags, clear_mm_flags as _clear_mm, tensor as _tensor)
from .tensor import NkiTensor as _NkiTensor
from .errors import ConstraintError as _ConstraintError, NkiValidationError as _NkiValidationError
from .objects import NKIObject as _NKIObject

_f32 = _np.float32


def _prod(shape):
    n = 1
    for x in shape:
        n *= x
    return n


# ---------------------------------------------------------------------------------------------------------- enums
# Member values as the official stubs give them (aws-neuron-sdk nki/api/nki/isa/__init__.py); plain Enums.
class engine(_enum.Enum):
    """Neuron Device engines."""
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


# deprecated aliases kept by the official API ("deprecated: use engine.tensor")
unknown_engine = engine.unknown
tensor_engine = engine.tensor
vector_engine = engine.vector
scalar_engine = engine.scalar
gpsimd_engine = engine.gpsimd


class reduce_cmd(_enum.Enum):
    """Engine register reduce commands."""
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class oob_mode(_enum.Enum):
    """Out-of-bounds access mode."""
    error = 0
    skip = 1


class dge_mode(_enum.Enum):
    """Descriptor Generation Engine mode."""
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class matmul_perf_mode(_enum.Enum):
    """Performance mode for matmul (the docs give no integer values)."""
    none = "none"
    double_row = "double_row"


class nc_version(_enum.Enum):
    """NeuronCore version."""
    gen2 = 2
    gen3 = 3
    gen4 = 4


class dma_engine(_enum.Enum):
    """DMA transfer engine of nisa.sendrecv (the docs give no integer values)."""
    dma = "dma"
    gpsimd_dma = "gpsimd_dma"


# unshadowed names for function bodies whose parameters are called engine/dge_mode/oob_mode/reduce_cmd
_ENG, _DGE, _OOB, _RC = engine, dge_mode, oob_mode, reduce_cmd

NkiValidationError = _NkiValidationError


class VirtualRegister(_NKIObject):
    """A virtual engine register (``nisa.register_alloc``): holds one 32-bit integer. The interpreter executes
    eagerly, so the register holds a concrete value (``register_load`` reads it from SBUF/HBM)."""

    def __init__(self, state=None, frozen=False):
        self._value = None if state is None else int(state)
        self._frozen = bool(frozen)

    def __repr__(self):
        return f"VirtualRegister({self._value})"

    def _get(self, where):
        if self._value is None:
            raise _ConstraintError(f"rule register.uninitialised: {where} reads a VirtualRegister that was never "
                                   "written (register_alloc() without a value, no register_move/register_load)")
        return self._value

    def __index__(self):
        return self._get("the kernel")

    __int__ = __index__

    def __bool__(self):
        return self._get("the kernel") != 0


def get_nc_version():
    """The target NeuronCore version (``NEURON_PLATFORM_TARGET_OVERRIDE``, default trn1 = gen2)."""
    return nc_version(_target.version())


def get_nc_sub_version():
    """The target's NeuronCore sub-version (revision) as an int. No reference page describes it; AWS's
    nki-library compares it only with 1 under ``nc_version.gen4`` (the revision that adds nisa.exponential).
    The interpreter models each generation's first revision: 0."""
    return 0


def _engine_name(e, default):
    if e is None or e is engine.unknown:
        return default
    if isinstance(e, engine):
        return e.name
    raise _ConstraintError(f"rule engine.type: engine={e!r} is not a nisa.engine member")


# ------------------------------------------------------------------------------------------ per-launch state
class _State:
    def __init__(self):
        self.act_regs = _np.zeros(128, _f32)       # ScalarE reduce registers (activation)
        self.dve_regs = _np.zeros(128, _f32)       # VectorE reduce registers (tensor_scalar_reduce)
        self.rng = _np.random.Generator(_np.random.PCG64(0))


_state = _State()


def _reset_state():
    global _state
    _state = _State()


# ---------------------------------------------------------------------------------------------------------- DMA
def _dma_operand(t, I, role):
    _tensor(t, I, role)
    if t._st.buffer == "psum":
        _fail("dma.psum", I, role, "is in PSUM; DMA cannot access PSUM (copy to SBUF with tensor_copy first)")
    if t._st.buffer == "sbuf":
        _chk(t, I, role, align=False)


def _dma_options(I, priority, dge_mode, engine=None):
    if priority is not None:
        _target.require(4, I, "priority (DMA QoS)")
    if dge_mode is _DGE.hwdge:
        _target.require(3, I, "dge_mode=hwdge")
    if engine is not None and engine is not _ENG.unknown:
        if dge_mode is not _DGE.hwdge:
            _fail("dma.engine", I, "engine", f"{engine.name}: an engine is only valid with dge_mode=hwdge")
        if engine not in (_ENG.sync, _ENG.scalar):
            _fail("dma.engine", I, "engine", f"{engine.name}: hwdge descriptors come from the sync or scalar "
                  "engine")


def _indirect_index(t, I, role, oob_mode):
    """Flat element indices of a vector-indirect HBM view (``.ap(vector_offset=)``): dim ``d`` of the view takes
    row ``idx[p]`` for its p-th entry. Returns (indices of t's shape, mask of in-bounds rows along d)."""
    _, idx_t, d = t._ind
    rows = idx_t._v.reshape(-1).astype(_np.int64)
    shape, strides = t.shape, t.strides
    rest = _np.zeros((), _np.int64)
    for k, (n, st) in enumerate(zip(shape, strides)):
        if k == d:
            continue
        ax = _np.arange(n, dtype=_np.int64) * st
        rest = _np.add.outer(rest, ax) if rest.ndim else ax
    # rows of the indexed tensor: the stride of dim d in elements
    span = int(t._flat.size)
    idx = t.offset + rows * strides[d]
    lo = idx + sum(min(0, (n - 1) * st) for k, (n, st) in enumerate(zip(shape, strides)) if k != d)
    hi = idx + sum(max(0, (n - 1) * st) for k, (n, st) in enumerate(zip(shape, strides)) if k != d)
    ok = (rows >= 0) & (lo >= 0) & (hi < span)
    if not ok.all() and oob_mode is not _OOB.skip:
        bad = int(rows[~ok][0])
        _fail("dma.oob", I, role, f"indirect row {bad} is out of bounds of {t.name!r} (oob_mode=error; pass "
              "oob_mode=nisa.oob_mode.skip to skip such rows)")
    full = _np.moveaxis(_np.add.outer(_np.where(ok, idx, 0), rest).reshape((shape[d],) + tuple(
        n for k, n in enumerate(shape) if k != d)), 0, d)
    return full, ok


def _dma_move(I, dst, src, oob_mode):
    """The element move of a DMA: ``dst = src`` (equal dtypes: bits; else src -> fp32 -> dst with RNE), through
    vector-indirect views when either side has one."""
    if dst.size != src.size:
        _fail("dma.count", I, "dst", f"has {dst.size} elements {list(dst.shape)} but src has {src.size} "
              f"{list(src.shape)}", src.size)
    s_ind = src._ind is not None and src._ind[0] == "vector"
    d_ind = dst._ind is not None and dst._ind[0] == "vector"
    if not (s_ind or d_ind):
        if dst.dtype == src.dtype:
            v = src._v
            dst._v[...] = v if v.shape == dst.shape else v.reshape(dst.shape)
        else:
            v = src._f32()
            dst._v[...] = _dt.cast(v if v.shape == dst.shape else v.reshape(dst.shape), dst.dtype)
        return
    if s_ind:
        gidx, ok = _indirect_index(src, I, "src", oob_mode)
        vals = src._flat[gidx]
    else:
        vals = src._v
    vals = vals.reshape(dst.shape) if vals.shape != dst.shape else vals
    if dst.dtype != src.dtype:
        vals = _dt.cast(vals.astype(_f32), dst.dtype)
    if d_ind:
        sidx, ok = _indirect_index(dst, I, "dst", oob_mode)
        d = dst._ind[2]
        keep = _np.moveaxis(_np.broadcast_to(ok.reshape((-1,) + (1,) * (dst.ndim - 1)),
                                             (dst.shape[d],) + tuple(n for k, n in enumerate(dst.shape) if k != d)),
                            0, d)
        dst._flat[sidx[keep]] = _np.asarray(vals)[keep]
    else:
        if s_ind:
            d = src._ind[2]
            keep = _np.moveaxis(_np.broadcast_to(ok.reshape((-1,) + (1,) * (src.ndim - 1)),
                                                 (src.shape[d],) + tuple(n for k, n in enumerate(src.shape)
                                                                         if k != d)), 0, d).reshape(dst.shape)
            dst._v[...] = _np.where(keep, vals, dst._v)
        else:
            dst._v[...] = vals


def dma_copy(dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
             name=None):
    """dst = src between HBM and SBUF (never PSUM since NKI 0.3). Element counts must match; when dtypes differ the
    value goes src -> fp32 -> dst (RNE); equal dtypes copy bits. Either side may be a vector-indirect HBM view
    (``.ap(vector_offset=)``: gather/scatter rows; out-of-bounds rows raise, or are skipped with oob_mode.skip)."""
    I = "dma_copy"
    _dma_operand(dst, I, "dst")
    _dma_operand(src, I, "src")
    _dma_options(I, priority, dge_mode, engine)
    if dge_mode is _DGE.hwdge and dst.dtype != src.dtype:
        _fail("dma.hwdge_dtype", I, "dst", "hwdge needs equal src/dst dtypes")
    _dma_move(I, dst, src, oob_mode)
    _emit("dma", I, (("dst", dst), ("src", src)), name)


_DMA_T_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, name=None):
    """dst = src permuted by ``axes`` ((1, 0), (2, 1, 0) or (3, 1, 2, 0), the rank's default) on a DMA engine.
    dst in SBUF, src in HBM or SBUF, equal dtypes. Only ``dge_mode`` unknown/hwdge (direct) or swdge with a
    vector-indirect src (indirect, NeuronCore-v3+); hwdge itself is v3+ and needs src.shape[0] in {1,2,4,8,16},
    src.shape[-1] <= 128 and 2-byte dtypes (0.6 relaxations)."""
    I = "dma_transpose"
    _tensor(dst, I, "dst")
    _tensor(src, I, "src")
    _chk(dst, I, "dst", ("sbuf",), align=False)
    _dma_operand(src, I, "src")
    _dma_options(I, priority, dge_mode)
    if dst.dtype != src.dtype:
        _fail("dma_transpose.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; src.dtype == dst.dtype is required "
              f"({_dt.name(src.dtype)})")
    indirect = src._ind is not None and src._ind[0] == "vector"
    if indirect:
        _target.require(3, I, "indirect transpose (vector_offset src)")
        if dge_mode not in (_DGE.unknown, _DGE.swdge):
            _fail("dma_transpose.dge_mode", I, "dge_mode", f"{dge_mode.name}: an indirect transpose uses swdge")
    elif dge_mode not in (_DGE.unknown, _DGE.hwdge):
        _fail("dma_transpose.dge_mode", I, "dge_mode", f"{dge_mode.name}: a direct transpose takes unknown or hwdge")
    if dge_mode is _DGE.hwdge and (src.shape[0] not in (1, 2, 4, 8, 16) or src.shape[-1] > 128 or
                                       src.dtype.itemsize != 2):
        _fail("dma_transpose.hwdge", I, "src", f"{list(src.shape)} {_dt.name(src.dtype)}: hwdge needs src.shape[0] "
              "in {1, 2, 4, 8, 16}, src.shape[-1] <= 128 and a 2-byte dtype")
    want = _DMA_T_AXES.get(src.ndim)
    ax = tuple(axes) if axes is not None else want
    if want is None or ax != want:
        _fail("dma_transpose.axes", I, "axes", f"{axes} for a {src.ndim}-d src; supported: (1, 0), (2, 1, 0), "
              "(3, 1, 2, 0)")
    out_shape = tuple(src.shape[a] for a in ax)
    if _prod(dst.shape) != _prod(out_shape) or (dst.ndim == len(out_shape) and tuple(dst.shape) != out_shape):
        _fail("dma_transpose.shape", I, "dst", f"shape {list(dst.shape)} must be {list(out_shape)}")
    if indirect:
        gidx, _ = _indirect_index(src, I, "src", oob_mode)
        vals = src._flat[gidx]
    else:
        vals = src._v
    dst._v[...] = _np.transpose(vals, ax).reshape(dst.shape)
    _emit("dma", I, (("dst", dst), ("src", src)), name)


def dma_compute(dst, srcs, reduce_op, scales=None, unique_indices=True, oob_mode=oob_mode.error, name=None):
    """dst = reduce_op(srcs[0] * scales[0], srcs[1] * scales[1], ...) in fp32 inside the DMA engines (reduce_op
    nl.add only, every scale 1.0, at most 16 sources of dst's element count, HBM or SBUF)."""
    I = "dma_compute"
    _dma_operand(dst, I, "dst")
    red = _ops.binary(reduce_op, I, "reduce_op", allowed=("add",))
    srcs = list(srcs)
    if not 1 <= len(srcs) <= 16:
        _fail("dma_compute.srcs", I, "srcs", f"has {len(srcs)} tensors", "1..16")
    if scales is not None and (len(scales) != len(srcs) or any(float(x) != 1.0 for x in scales)):
        _fail("dma_compute.scales", I, "scales", f"{list(scales)}: every scale must be 1.0 (one per src)")
    if not unique_indices:
        _fail("dma_compute.unique", I, "unique_indices", "False (non-unique indices) is not supported")
    acc = None
    for k, t in enumerate(srcs):
        _dma_operand(t, I, f"srcs[{k}]")
        if t.size != dst.size:
            _fail("dma.count", I, f"srcs[{k}]", f"has {t.size} elements; dst has {dst.size}", dst.size)
        v = t._f32().reshape(dst.shape)
        acc = v.astype(_f32, copy=True) if acc is None else red.fn(acc, v)
    dst._v[...] = _dt.cast(acc, dst.dtype)
    _emit("dma", I, [("dst", dst)] + [(f"srcs[{k}]", t) for k, t in enumerate(srcs)], name)


# ---------------------------------------------------------------------------------------------- Tensor engine
_MM_IN_DTYPES = (_dt.float32, _dt.tfloat32, _dt.bfloat16, _dt.float16, _dt.float8_e4m3, _dt.float8_e5m2,
                 _dt.float8_e4m3fn)
def _gemm_out_ok(out, m, n):
    """True when numpy's matmul of [m, K] x [K, n] fp32 operands may write straight into the 2-d fp32 array ``out``
    through the same BLAS gemm call it makes for a fresh C-contiguous result: unit element stride along the rows,
    a row stride of at least n elements (numpy's "C-blasable" output), and m, n >= 2 (numpy takes gemv/dot paths
    for vector shapes; those stay on the temporary)."""
    if out.ndim != 2 or m < 2 or n < 2:
        return False
    s0, s1 = out.strides
    return s1 == 4 and s0 % 4 == 0 and s0 >= 4 * n and s0 // 4 < (1 << 31)


def _disjoint_of(shape, strides):
    """True when no two elements of a view with these element strides share memory (an in-place update is then
    the same as a computed-then-assigned one)."""
    span = 1
    for c, st in sorted(((c, abs(st)) for c, st in zip(shape, strides) if c > 1), key=lambda x: x[1]):
        if st < span:
            return False
        span += st * (c - 1)
    return True


_disjoint = _functools.lru_cache(maxsize=1024)(_disjoint_of)    # a pure function of two tuples, asked per matmul


def _rank1(s, mv):
    """``np.matmul(s.T, mv)`` for a contraction of size 1 (s [1, M], mv [1, N] fp32): numpy computes each element
    as ``0 + s[0, i] * mv[0, j]`` (through a slow generic loop for these shapes); the outer product plus +0.0 gives
    the same bits (-0.0 products become +0.0, as in the matmul) ~5x faster. Operands holding a NaN go through
    np.matmul (which NaN payload a NaN * NaN product keeps is not pinned down); None then.
    tests/test_sim_speed_paths.py compares the two."""
    if _np.isnan(s).any() or _np.isnan(mv).any():
        return None
    r = _np.multiply(s.reshape(-1, 1), mv)
    r += _f32(0.0)
    return r


def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              accumulate=None, tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None):
    """dst[M, N] (PSUM, fp32) = stationary[K, M].T @ moving[K, N], accumulated in fp32.

    accumulate: False overwrites; True adds to dst (error when a dst element was not last written by a matmul:
    hardware UB); None overwrites elements not yet written by a matmul since they were allocated (or last written
    by another instruction) and accumulates onto the others."""
    I = "nc_matmul"
    k, _, m = _chk(stationary, I, "stationary", ("sbuf",))
    k2, _, n = _chk(moving, I, "moving", ("sbuf",))
    mp, _, nd = _chk(dst, I, "dst", ("psum",))
    if k != k2:
        _fail("matmul.contraction", I, "moving", f"partition (contraction) size {k2} differs from stationary's {k}", k)
    if m > 128:
        _fail("matmul.stationary_free", I, "stationary", f"free size {m} exceeds 128", 128)
    if n > 512:
        _fail("matmul.moving_free", I, "moving", f"free size {n} exceeds 512", 512)
    if mp != m or nd != n:
        _fail("matmul.dst_shape", I, "dst", f"shape {list(dst.shape)} must be [{m}, {n}] (stationary free x moving "
             f"free)")
    v = _target.version()
    if dst.dtype != _dt.float32 or _dt.is_tf32(dst.dtype):
        if v == 2 or dst.dtype != _dt.bfloat16:
            _fail("matmul.dst_dtype", I, "dst", f"is {_dt.name(dst.dtype)}; nc_matmul dst dtype must be float32 on "
                 f"gen2" + ("" if v == 2 else " (bfloat16 allowed on gen3+)"), "float32")
    for role, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MM_IN_DTYPES:
            _fail("matmul.dtype", I, role, f"dtype {_dt.name(t.dtype)} is not a matmul input type (fp8/bf16/fp16/"
                 f"tf32/fp32)")
    f32s = stationary.dtype in (_dt.float32, _dt.tfloat32)
    f32m = moving.dtype in (_dt.float32, _dt.tfloat32)
    if f32s != f32m:
        _fail("matmul.fp32_pair", I, "moving" if f32s else "stationary", "fp32/tf32 operands must be paired (both "
             f"fp32/tf32): stationary {_dt.name(stationary.dtype)}, moving {_dt.name(moving.dtype)}")
    # dst must stay within one 2 KiB PSUM bank per partition
    st = dst._st
    isz = dst._flat.itemsize
    fs = st.free_size * st.flat.itemsize // isz
    lo = dst.offset % fs
    hi = lo
    for c, stride in zip(dst.shape[1:], dst.strides[1:]):
        hi += (c - 1) * stride
    if (lo * isz) // 2048 != (hi * isz + isz - 1) // 2048:
        _fail("matmul.psum_bank", I, "dst", f"spans PSUM bytes {lo * isz}..{hi * isz + isz - 1} of each partition, "
             f"crossing a 2 KiB bank boundary", "one 2048-byte bank")
    if perf_mode is not None and perf_mode is not matmul_perf_mode.none and perf_mode != "none":
        _target.require(3, I, "perf_mode")
    if tile_size:
        if v == 2 and (32 in tuple(tile_size)):
            _fail("matmul.tile_size", I, "tile_size", f"{tile_size}: tiles of 32 are not supported on NeuronCore-v2",
                 "64 or 128")
    s = stationary._f32().reshape(k, m)
    mv = moving._f32().reshape(k, n)
    flags = _mm_flags(dst)
    out = dst._v
    if accumulate is True and not flags.all():
        _fail("matmul.accumulate", I, "dst", "accumulate=True into PSUM elements not written by a matmul "
             "(uninitialised or written by another engine): undefined on hardware")
    # out += res is the same fp32 add as out[...] = out + res when no two elements of the view share memory
    in_place = out.dtype == _f32 and _disjoint(dst.shape, dst.strides)
    if accumulate is True:
        mode = "add"
    elif accumulate is False:
        mode = "set"
    elif flags.all():
        mode = "add"
    elif not flags.any():
        mode = "set"
    else:
        mode = "mixed"
    _matmul_into(out, dst.shape, dst.dtype, flags, s, mv, mode, in_place, accumulate is True)
    _emit("tensor", I, (("dst", dst), ("stationary", stationary), ("moving", moving)), name)


def _matmul_into(out, shape, dtype, flags, s, mv, mode, in_place, strict):
    """PSUM view values ``out`` (NKI ``shape`` and ``dtype``) <- s.T @ mv by ``mode``: "set" overwrites, "add" accumulates in
    fp32, "mixed" adds where ``flags`` (matmul-written) and overwrites elsewhere; the flags are all set afterwards.
    ``in_place``: out is fp32 with disjoint elements (out += res is then the fp32 add). ``strict``: accumulate=True
    (whose add keeps numpy's assignment cast, as before)."""
    (k, m), n = s.shape, mv.shape[1]
    if mode == "set" and k > 1 and in_place and _gemm_out_ok(out, m, n):
        # the product straight into the PSUM view: the same sgemm call as into a fresh C-contiguous array (only the
        # leading dimension of C differs), without the temporary and its copy (tests/test_sim_speed_paths.py)
        _np.matmul(s.T, mv, out=out)
    else:
        res = _rank1(s, mv) if k == 1 else None
        if res is None:
            res = _np.matmul(s.T, mv)
        res = res.reshape(shape)
        if mode == "add":
            if in_place:
                out += res
            elif strict:
                out[...] = (out.astype(_f32) + res) if out.dtype != _f32 else out + res
            else:
                out[...] = _dt.cast(out.astype(_f32) + res, dtype)
        elif mode == "set":
            out[...] = _dt.cast(res, dtype)
        else:
            out[...] = _dt.cast(_np.where(flags, out.astype(_f32) + res, res), dtype)
    if mode != "add":                   # "add": every flag was already set
        flags[...] = True


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """dst[F, P] = data[P, F] (free dims flattened). Tensor engine: data SBUF <= [128,128] -> dst PSUM; Vector
    engine: <= [32,32], SBUF/PSUM. "The output dst tile must have the same data type as that of data"
    (nki.isa.nc_transpose)."""
    I = "nc_transpose"
    _tensor(dst, I, "dst")
    _tensor(data, I, "data")
    eng = _engine_name(engine, "tensor" if (dst._st.buffer == "psum" and data._st.buffer == "sbuf") else "vector")
    if eng == "tensor":
        p, _, f = _chk(data, I, "data", ("sbuf",))
        pd, _, fd = _chk(dst, I, "dst", ("psum",))
        lim = 128
        if dst.dtype != data.dtype:
            _fail("transpose.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    elif eng == "vector":
        p, _, f = _chk(data, I, "data")
        pd, _, fd = _chk(dst, I, "dst")
        lim = 32
        if dst.dtype != data.dtype:
            _fail("transpose.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    else:
        _fail("engine", I, "engine", f"{eng} cannot transpose; use the tensor or vector engine")
    if p > lim or f > lim:
        _fail("transpose.size", I, "data", f"is [{p}, {f}]; the {eng} engine transposes at most [{lim}, {lim}]",
             f"[{lim}, {lim}]")
    if pd != f or fd != p:
        _fail("transpose.shape", I, "dst", f"shape {list(dst.shape)} must be [{f}, {p}]")
    if dst.dtype == data.dtype and eng == "vector":
        dst._v[...] = data._v.reshape(p, f).T.reshape(dst.shape)
        _clear_mm(dst)
    elif dst.dtype == data.dtype and dst.dtype in (_dt.float32, _dt.bfloat16):
        # the fp32 round trip of the general path as bits: fp32 -> fp32 is the identity; bf16 -> fp32 -> bf16 is
        # too, except that a NaN comes back as sign | 0x7FC0 (tests/test_sim_speed_paths.py)
        dst._v[...] = _dt.same_dtype_roundtrip(data._v.reshape(p, f).T).reshape(dst.shape)
        _clear_mm(dst)
    else:
        _store(dst, data._f32().reshape(p, f).T)   # a complete write: a later accumulate=None matmul overwrites it
    _emit(eng, I, (("dst", dst), ("data", data)), name)


# ---------------------------------------------------------------------------------------------- Scalar engine
def _bias_scale(I, p, bias, scale):
    b = None
    if bias is not None:
        if isinstance(bias, _NkiTensor):
            pb, _, nb = _chk(bias, I, "bias")
            if nb != 1:
                _fail("activation.bias", I, "bias", f"is {list(bias.shape)}; must be a [P,1] tile", "[P,1]")
            _same_p(I, "data", p, "bias", pb)
            if _dt.is_tf32(bias.dtype):
                _fail("activation.bias", I, "bias", "dtype tfloat32 is not allowed")
            b = bias._f32().reshape(pb, 1)
        else:
            if _target.version() == 2:
                _fail("activation.bias", I, "bias", f"is the scalar {bias!r}; on NeuronCore-v2 bias must be a [P,1] "
                     "tile", "[P,1] tile")
            b = float(bias)
    sc = _scalar_or_col(scale, I, "scale", p)
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
        _fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by the interpreter")


_ACT_FUNCTIONS = _ops.OP_RULES["activation"]


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle,
               name=None):
    """dst = op(data * scale + bias) in fp32 on the Scalar engine, with the optional free-axis reduction into the
    engine's 128 fp32 reduce registers (reduce_cmd idle/reset/reduce/reset_reduce); reduce_res [P,1] reads them
    out."""
    I = "activation"
    return _activation(I, dst, op, data, bias, scale, reduce_op, reduce_res, reduce_cmd, name)


def _activation(I, dst, op, data, bias, scale, reduce_op, reduce_res, cmd, name):
    fn = _ops.unary(op, I, allowed=_ACT_FUNCTIONS)
    p, pstart, n = _tiles(I, ("data", data), ("dst", dst))
    b, sc = _bias_scale(I, p, bias, scale)
    if fn.name == "reciprocal" and bias is not None and _target.version() == 2:
        _fail("activation.bias", I, "bias", "activation(op=reciprocal) does not support bias on NeuronCore-v2")
    if cmd is None:
        cmd = reduce_cmd.idle
    red = None
    uses_reduce = cmd in (reduce_cmd.reduce, reduce_cmd.reset_reduce)
    if uses_reduce or reduce_op is not None:
        if reduce_op is None:
            _fail("activation.reduce_op", I, "reduce_op", f"is required with reduce_cmd={cmd.name}")
        red = _ops.binary(reduce_op, I, "reduce_op")
        if red.name != "add" and _target.version() == 2:
            _fail("activation.reduce_op", I, "reduce_op", f"is {red.name}; only add is supported on NeuronCore-v2",
                 "add")
    if cmd is reduce_cmd.load_reduce:
        _fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by activation in the interpreter")
    if reduce_res is not None:
        pr, _, nr = _chk(reduce_res, I, "reduce_res")
        _same_p(I, "data", p, "reduce_res", pr)
        if nr != 1:
            _fail("activation.reduce_res", I, "reduce_res", f"is {list(reduce_res.shape)}; must be [P,1]", "[P,1]")
    if fn.name == "copy" and b is None and isinstance(sc, float) and sc == 1.0 and not uses_reduce and \
            dst.dtype == data.dtype and dst.dtype in (_dt.float32, _dt.bfloat16):
        # copy(data * 1.0) -> dst of data's dtype: the fp32 round trip as bits (dtypes.same_dtype_roundtrip)
        v = data._v
        v = v if v.ndim == 2 else v.reshape(p, n)
        dst._v[...] = (v if dst.dtype == _dt.float32 else _dt.same_dtype_roundtrip(v)).reshape(dst.shape)
        _clear_mm(dst)
        partial = None
    else:
        x = data._f32()
        if x.ndim != 2:
            x = x.reshape(p, n)
        if sc != 1.0 if isinstance(sc, float) else True:
            x = x * sc
        if b is not None:
            x = x + b
        y = fn.unary(x)
        _store(dst, y)
        partial = red.reduce(y, -1) if (uses_reduce and red is not None) else None
    _apply_reduce_regs(_state.act_regs, pstart, p, cmd, red, partial, I)
    if reduce_res is not None:
        _store(reduce_res, _state.act_regs[pstart:pstart + p].reshape(p, 1))
    _emit("scalar", I, (("dst", dst), ("data", data), ("bias", bias if isinstance(bias, _NkiTensor) else None),
                       ("scale", scale if isinstance(scale, _NkiTensor) else None), ("reduce_res", reduce_res)), name)


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """activation with reduce_cmd=reset_reduce and read-out into reduce_res [P,1]."""
    return _activation("activation_reduce", dst, op, data, bias, scale, reduce_op, reduce_res,
                       reduce_cmd.reset_reduce, name)


# ---------------------------------------------------------------------------------------------- Vector engine
def _int_values(t, logical=False):
    """Integer element values as int64; ``logical`` reads the unsigned bit pattern (nl.right_shift is a logical
    shift: "arithmetic shift right is not supported" in the nki-aluop table)."""
    v = t._v
    if logical and v.dtype.kind == "i":
        v = v.view(_np.dtype(f"u{v.dtype.itemsize}"))
    return v.astype(_np.int64)


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = data1 <op> data2 elementwise (no broadcasting). fp32 on the Vector engine; power and all-integer
    (int32/uint32) operations run on GpSimd with exact integer math (SBUF only)."""
    I = "tensor_tensor"
    opd = _ops.binary(op, I)
    _tiles(I, ("data1", data1), ("data2", data2), ("dst", dst))
    if data1._st.buffer == "psum" and data2._st.buffer == "psum":
        _fail("tensor_tensor.psum", I, "data2", "and data1 are both in PSUM; at most one input may be in PSUM")
    ints = data1.dtype.kind in "iu" and data2.dtype.kind in "iu" and dst.dtype.kind in "iu"
    int32ish = ints and (data1.dtype.itemsize == 4 or data2.dtype.itemsize == 4 or dst.dtype.itemsize == 4)
    # "the automatic GpSimd dispatch for int32/uint32 falls back to Vector Engine when any operand resides in
    # PSUM" (nki.isa.tensor_tensor)
    in_psum = "psum" in (data1._st.buffer, data2._st.buffer, dst._st.buffer)
    default = "gpsimd" if (opd.name == "power" or (int32ish and not in_psum)) else "vector"
    eng = _engine_name(engine, default)
    if eng not in ("vector", "gpsimd"):
        _fail("engine", I, "engine", f"{eng}: tensor_tensor runs on the Vector or GpSimd engine")
    if eng == "gpsimd":
        for role, t in (("dst", dst), ("data1", data1), ("data2", data2)):
            _no_psum(t, I, role, "GpSimd")
    if opd.kind == "bitvec" or (eng == "gpsimd" and ints):
        if not ints:
            _fail("op.bitvec", I, "data1", f"bitwise op {opd.name} needs integer operands, got "
                 f"{_dt.name(data1.dtype)}/{_dt.name(data2.dtype)} -> {_dt.name(dst.dtype)}")
        a = _int_values(data1, opd.name == "right_shift")
        b = _int_values(data2)
        if b.shape != a.shape:
            b = b.reshape(a.shape)
        with _np.errstate(all="ignore"):
            r = opd.fn(a, b)
        r = _np.asarray(r)
        if r.dtype.kind == "f":
            _store(dst, r)
        else:
            dst._v[...] = r.reshape(dst.shape).astype(dst.dtype)   # two's-complement wrap like integer ALUs
            _clear_mm(dst)
    else:
        a = data1._f32()
        b = data2._f32()
        if b.shape != a.shape:
            b = b.reshape(a.shape)
        with _np.errstate(all="ignore"):
            _store(dst, opd.fn(a, b))
    _emit(eng, I, (("dst", dst), ("data1", data1), ("data2", data2)), name, (opd.name,))


def _scalar_op(opd, x, operand, reverse):
    with _np.errstate(all="ignore"):
        if opd.kind == "bitvec":
            o = operand.astype(_np.int64) if isinstance(operand, _np.ndarray) else int(operand)
            return opd.fn(o, x) if reverse else opd.fn(x, o)
        o = operand if isinstance(operand, _np.ndarray) else _f32(operand)
        return opd.fn(o, x) if reverse else opd.fn(x, o)


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data <op0> operand0) <op1> operand1 with operands Python scalars or [P,1] fp32 tiles broadcast along
    the free dims (reverse swaps the operand order). Both ops arithmetic or both bitvec."""
    I = "tensor_scalar"
    unary0 = isinstance(op0, _ops.Op) and op0.fn is None and op0.unary is not None
    if unary0:
        o0 = _ops.unary(op0, I, "op0", allowed=_ops.OP_RULES["tensor_scalar.unary"])
        if o0.name in _ops.OP_RULES["tensor_scalar.unary_v4"]:
            _target.require(4, I, f"op0=nl.{o0.name}")
        if operand0 is not None and not (isinstance(operand0, (int, float)) and operand0 == 0):
            _fail("tensor_scalar.unary", I, "operand0", f"must be None or 0 when op0 is the unary nl.{o0.name}")
    else:
        o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1") if op1 is not None else None
    p, _, n = _tiles(I, ("data", data), ("dst", dst))
    bit0 = o0.kind == "bitvec"
    if o1 is not None and (o1.kind == "bitvec") != bit0:
        _fail("tensor_scalar.op_class", I, "op1", f"{o1.name} and op0 {o0.name} must both be arithmetic or both "
             "bitvec")
    eng = _engine_name(engine, "vector")
    if bit0 and eng != "vector":
        _fail("engine", I, "engine", f"{eng}: bitvec operators run on the Vector engine only", "vector")
    if eng == "gpsimd":
        _no_psum(data, I, "data", "GpSimd")
        _no_psum(dst, I, "dst", "GpSimd")
    elif eng == "scalar":
        pair = (o0.name, o1.name if o1 else None)
        if pair not in (("multiply", "add"), ("multiply", None), ("add", None)):
            _fail("engine", I, "engine", f"the Scalar engine supports only (multiply, add), (multiply,), (add,); got "
                 f"{pair}")
    elif eng != "vector":
        _fail("engine", I, "engine", f"{eng} cannot run tensor_scalar")
    v0 = None if unary0 else _scalar_or_col(operand0, I, "operand0", p, fp32_tile=not bit0)
    v1 = _scalar_or_col(operand1, I, "operand1", p, fp32_tile=not bit0) if o1 is not None else None
    if bit0:
        if data.dtype.kind not in "iu" or dst.dtype.kind not in "iu":
            _fail("op.bitvec", I, "data", f"bitvec op {o0.name} needs integer data/dst, got "
                 f"{_dt.name(data.dtype)} -> {_dt.name(dst.dtype)}")
        x = _int_values(data, o0.name == "right_shift").reshape(p, n)
    else:
        x = data._f32()
        if x.ndim != 2:
            x = x.reshape(p, n)
    y = o0.unary(x) if unary0 else _scalar_op(o0, x, v0, reverse0)
    if o1 is not None:
        y = _scalar_op(o1, y, v1, reverse1)
    if bit0:
        dst._v[...] = y.reshape(dst.shape).astype(dst.dtype)
    else:
        _store(dst, y)
    _emit(eng, I, (("dst", dst), ("data", data),
                  ("operand0", operand0 if isinstance(operand0, _NkiTensor) else None),
                  ("operand1", operand1 if isinstance(operand1, _NkiTensor) else None)), name,
          (o0.name,) if o1 is None else (o0.name, o1.name))


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """dst = (data <op0> operand0) <op1> operand1; operand0 a scalar or [P,1] tile, operand1 a full tile."""
    I = "scalar_tensor_tensor"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1")
    p, _, n = _tiles(I, ("data", data), ("dst", dst), ("operand1", operand1))
    if data._st.buffer == "psum" and operand1._st.buffer == "psum":
        _fail("scalar_tensor_tensor.psum", I, "operand1", "and data are both in PSUM; at most one may be")
    if o0.kind == "bitvec" or o1.kind == "bitvec":
        _fail("op.bitvec", I, "op0", "bitvec ops are not supported by scalar_tensor_tensor in the interpreter")
    v0 = _scalar_or_col(operand0, I, "operand0", p, fp32_tile=False)   # dtype not restricted by the docs
    x = data._f32().reshape(p, n)
    y = _scalar_op(o0, x, v0, reverse0)
    t = operand1._f32().reshape(p, n)
    with _np.errstate(all="ignore"):
        y = o1.fn(t, y) if reverse1 else o1.fn(y, t)
    _store(dst, y)
    _emit("vector", I, (("dst", dst), ("data", data), ("operand0", operand0 if isinstance(operand0, _NkiTensor)
                                                                     else None), ("operand1", operand1)), name,
          (o0.name, o1.name))


def _reduce_axes(I, data, axis):
    if isinstance(axis, (list, tuple)):
        axes = sorted(int(a) % data.ndim for a in axis)
    else:
        axes = [int(axis) % data.ndim]
    if not axes or axes[0] == 0:
        _fail("reduce.axis", I, "axis", f"{axis} includes the partition dim 0; reductions run along free dims only")
    if axes != list(range(axes[0], data.ndim)):
        _fail("reduce.axis", I, "axis", f"{axis} must be the last contiguous free dims of {list(data.shape)} "
             f"(e.g. ({data.ndim - 1},) or ({data.ndim - 2}, {data.ndim - 1}))")
    return axes


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """dst = reduce_op over the trailing free ``axis`` dims of data (fp32); negate multiplies by -1."""
    I = "tensor_reduce"
    opd = _ops.binary(op, I, allowed=_ops.OP_RULES["tensor_reduce"])
    if opd.reduce is None:
        _fail("reduce.op", I, "op", f"{opd.name} is not a legal reduction (add, subtract, multiply, maximum, minimum, "
             "bitwise/logical and/or/xor)")
    p, _, n = _chk(data, I, "data")
    pd, _, nd = _chk(dst, I, "dst")
    _same_p(I, "data", p, "dst", pd)
    axes = _reduce_axes(I, data, axis)
    kept = 1
    for a in range(1, axes[0]):
        kept *= data.shape[a]
    _same_f(I, "reduced data", kept, "dst", nd)
    r = 1
    for a in axes:
        r *= data.shape[a]
    if opd.kind == "bitvec":
        x = _int_values(data).reshape(p, kept, r)
        y = opd.reduce(x, -1)
        if negate:
            y = -y
        dst._v[...] = y.reshape(dst.shape).astype(dst.dtype)
    else:
        x = data._f32().reshape(p, kept, r)
        with _np.errstate(all="ignore"):
            y = opd.reduce(x, -1)
        if negate:
            y = -y
        _store(dst, y)
    _emit("vector", I, (("dst", dst), ("data", data)), name, (opd.name,))


def tensor_scalar_reduce(dst, data, op0, operand0, reduce_op, reduce_res=None, reverse0=False,
                         reduce_cmd=reduce_cmd.reset_reduce, reduce_init=None, name=None):
    """dst = data <op0> operand0 (one arithmetic op), plus a reduction over all free dims into the Vector engine's
    128 accumulator registers (reduce_op nl.add/multiply/maximum/minimum, or the documented nl.max/nl.min):
    reset_reduce (default) resets them to the op's identity then accumulates, reduce keeps accumulating,
    load_reduce loads ``reduce_init`` (scalar or [P,1]) then accumulates. ``reduce_res`` [P,1] (optional since
    0.6) receives the registers."""
    I = "tensor_scalar_reduce"
    o0 = _ops.binary(op0, I, "op0")
    if o0.kind == "bitvec":
        _fail("op.bitvec", I, "op0", f"{o0.name}: tensor_scalar_reduce takes an arithmetic op only")
    red = _ops.binary(reduce_op, I, "reduce_op", allowed=_ops.OP_RULES["tensor_scalar_reduce.reduce_op"],
                      reduction_names=True)
    cmd = reduce_cmd
    if not isinstance(cmd, _RC) or cmd.name not in _ops.OP_RULES["tensor_scalar_reduce.reduce_cmd"]:
        _fail("reduce_cmd", I, "reduce_cmd", f"{cmd!r}: supported are reset_reduce, reduce, load_reduce")
    p, pstart, n = _tiles(I, ("data", data), ("dst", dst))
    v0 = _scalar_or_col(operand0, I, "operand0", p)
    if reduce_res is not None:
        pr, _, nr = _chk(reduce_res, I, "reduce_res")
        _same_p(I, "data", p, "reduce_res", pr)
        if nr != 1:
            _fail("reduce_res.shape", I, "reduce_res", f"is {list(reduce_res.shape)}; must be [P,1]", "[P,1]")
    if cmd is _RC.load_reduce:
        if reduce_init is None:
            _fail("reduce_init", I, "reduce_init", "is required with reduce_cmd=load_reduce")
    elif reduce_init is not None:
        _fail("reduce_init", I, "reduce_init", "should only be set when reduce_cmd is load_reduce")
    x = data._f32().reshape(p, n)
    y = _np.asarray(_scalar_op(o0, x, v0, reverse0), _f32)
    _store(dst, y)
    with _np.errstate(all="ignore"):
        partial = red.reduce(y, -1)
    regs = _state.dve_regs
    if cmd is _RC.reset_reduce:
        regs[pstart:pstart + p] = red.identity
    elif cmd is _RC.load_reduce:
        iv = _scalar_or_col(reduce_init, I, "reduce_init", p)
        regs[pstart:pstart + p] = iv.reshape(-1) if isinstance(iv, _np.ndarray) else iv
    with _np.errstate(all="ignore"):
        regs[pstart:pstart + p] = red.fn(regs[pstart:pstart + p], partial)
    if reduce_res is not None:
        _store(reduce_res, regs[pstart:pstart + p].reshape(p, 1))
    _emit("vector", I, (("dst", dst), ("data", data), ("reduce_res", reduce_res)), name)


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """dst = src; bit-exact when dtypes are equal, else via fp32 with RNE. Not on the Scalar engine on v2; the
    GpSimd engine cannot access PSUM."""
    I = "tensor_copy"
    p, _, n = _tiles(I, ("src", src), ("dst", dst))
    eng = _engine_name(engine, "vector")
    if eng == "scalar" and _target.version() == 2:
        _fail("engine", I, "engine", "tensor_copy is not supported on the Scalar engine on NeuronCore-v2 (use "
             "activation(op=nl.copy))")
    if eng == "gpsimd":
        _no_psum(src, I, "src", "GpSimd")
        _no_psum(dst, I, "dst", "GpSimd")
    if eng not in ("vector", "gpsimd", "scalar"):
        _fail("engine", I, "engine", f"{eng} cannot run tensor_copy")
    if src.dtype == dst.dtype:
        v = src._v
        dst._v[...] = v if v.shape == dst.shape else v.reshape(dst.shape)
        _clear_mm(dst)
    else:
        _store(dst, src._f32())
    _emit(eng, I, (("dst", dst), ("src", src)), name)


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill dst with a compile-time constant whose type matches dst's dtype (an int for integer tensors)."""
    I = "memset"
    _chk(dst, I, "dst")
    eng = _engine_name(engine, "vector")
    if eng == "gpsimd":
        _no_psum(dst, I, "dst", "GpSimd")
    if isinstance(value, _NkiTensor) or not isinstance(value, (bool, int, float, _np.integer, _np.floating)):
        _fail("memset.value", I, "value", f"must be a Python number, got {type(value).__name__}")
    if dst.dtype.kind in "iu" and not isinstance(value, (bool, int, _np.integer)):
        _fail("memset.value", I, "value", f"{value!r} is a float but dst is {_dt.name(dst.dtype)}; use an int literal")
    if dst.dtype.kind in "iub":
        info = _np.iinfo(dst.dtype) if dst.dtype.kind != "b" else None
        if info is not None and not info.min <= int(value) <= info.max:
            _fail("memset.value", I, "value", f"{value} does not fit {_dt.name(dst.dtype)}")
        dst._v[...] = value
    else:
        dst._v[...] = _dt.cast(_np.array(value, dtype=_f32), dst.dtype)
    _clear_mm(dst)
    _emit(eng, I, (("dst", dst),), name)


def reciprocal(dst, data, name=None):
    """dst = 1 / data on the Vector engine (fp32)."""
    I = "reciprocal"
    p, _, n = _tiles(I, ("data", data), ("dst", dst))
    with _np.errstate(all="ignore"):
        _store(dst, _f32(1.0) / data._f32().reshape(p, n))
    _emit("vector", I, (("dst", dst), ("data", data)), name)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """res[:,0] = op1(op0(data0[:,0], initial), data1[:,0]); res[:,i] = op1(op0(data0[:,i], res[:,i-1]), data1[:,i])."""
    I = "tensor_tensor_scan"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1")
    p, _, n = _tiles(I, ("data0", data0), ("data1", data1), ("dst", dst))
    if data0._st.buffer == "psum" and data1._st.buffer == "psum":
        _fail("tensor_tensor_scan.psum", I, "data1", "and data0 are both in PSUM; \"data0 and data1 cannot both "
              "reside in PSUM\" (nki.isa.tensor_tensor_scan)")
    init = _scalar_or_col(initial, I, "initial", p)
    a = data0._f32().reshape(p, n)
    b = data1._f32().reshape(p, n)
    out = _np.empty((p, n), _f32)
    prev = _np.broadcast_to(_np.asarray(init, _f32).reshape(-1), (p,)) if isinstance(init, _np.ndarray) else \
        _np.full(p, init, _f32)
    with _np.errstate(all="ignore"):
        for i in range(n):
            t = o0.fn(prev, a[:, i]) if reverse0 else o0.fn(a[:, i], prev)
            prev = o1.fn(b[:, i], t) if reverse1 else o1.fn(t, b[:, i])
            out[:, i] = prev
    _store(dst, out)
    _emit("vector", I, (("dst", dst), ("data0", data0), ("data1", data1)), name)


def bn_stats(dst, data, name=None):
    """6 values per partition: (count, mean, variance*count) of the even then of the odd free elements (fp32);
    data has at most 512 elements per partition."""
    I = "bn_stats"
    p, _, n = _chk(data, I, "data")
    pd, _, nd = _chk(dst, I, "dst")
    _same_p(I, "data", p, "dst", pd)
    if n > 512:
        _fail("bn_stats.fmax", I, "data", f"has {n} elements per partition", 512)
    if nd != 6:
        _fail("bn_stats.dst", I, "dst", f"has {nd} elements per partition; must be 6", 6)
    x = data._f32().reshape(p, n)
    out = _np.zeros((p, 6), _f32)
    for j, part in enumerate((x[:, 0::2], x[:, 1::2])):
        c = part.shape[1]
        out[:, 3 * j] = c
        if c:
            m = part.mean(axis=1, dtype=_f32)
            out[:, 3 * j + 1] = m
            out[:, 3 * j + 2] = _np.sum((part - m[:, None]) ** 2, axis=1, dtype=_f32)
    _store(dst, out)
    _emit("vector", I, (("dst", dst), ("data", data)), name)


def bn_aggr(dst, data, name=None):
    """Aggregate (count, mean, variance*count) triples into (mean, variance) per partition (fp32)."""
    I = "bn_aggr"
    p, _, n = _chk(data, I, "data")
    pd, _, nd = _chk(dst, I, "dst")
    _same_p(I, "data", p, "dst", pd)
    if n % 3:
        _fail("bn_aggr.data", I, "data", f"has {n} elements per partition; must be a multiple of 3")
    if nd != 2:
        _fail("bn_aggr.dst", I, "dst", f"has {nd} elements per partition; must be 2 (mean, variance)", 2)
    t = data._f32().reshape(p, n // 3, 3)
    c, m, m2 = t[..., 0], t[..., 1], t[..., 2]
    total = c.sum(axis=1, dtype=_f32)
    with _np.errstate(all="ignore"):
        mean = _np.where(total > 0, (c * _np.where(c > 0, m, 0)).sum(axis=1, dtype=_f32) / total, 0).astype(_f32)
        dev = _np.where(c > 0, c * (m - mean[:, None]) ** 2 + m2, 0)
        var = _np.where(total > 0, dev.sum(axis=1, dtype=_f32) / total, 0).astype(_f32)
    _store(dst, _np.stack([mean, var], axis=1))
    _emit("vector", I, (("dst", dst), ("data", data)), name)


def max8(dst, src, name=None):
    """The 8 largest values of each partition of src, in descending order, into dst [P, 8] (Vector engine)."""
    I = "max8"
    p, _, n = _chk(src, I, "src")
    pd, _, nd = _chk(dst, I, "dst")
    _same_p(I, "src", p, "dst", pd)
    if nd != 8:
        _fail("max8.dst", I, "dst", f"has {nd} elements per partition; must be 8", 8)
    if n < 8 or n > 16384:
        _fail("max8.src", I, "src", f"has {n} elements per partition; must be 8..16384", "8..16384")
    x = src._f32().reshape(p, n)
    _store(dst, -_np.sort(-x, axis=1)[:, :8])
    _emit("vector", I, (("dst", dst), ("src", src)), name)


def select_reduce(dst, predicate, on_true, on_false, reduce_res=None, reduce_cmd=reduce_cmd.idle,
                  reduce_op=_ops.BINARY["maximum"], reverse_pred=False, name=None):
    """dst = where(predicate != 0, on_true, on_false) (predicate inverted by reverse_pred) on the Vector engine, with
    an optional row max into reduce_res [P,1]: idle gives this instruction's row max; reset/reset_reduce/reduce drive
    the Vector accumulator registers (reset to -inf). on_false: fp32 scalar or [P,1] tile; predicate int8/uint8/
    int16/uint16; on_true and predicate not both in PSUM; on_true not tfloat32/int32/uint32."""
    I = "select_reduce"
    p, pstart, n = _tiles(I, ("on_true", on_true), ("predicate", predicate), ("dst", dst))
    if on_true._st.buffer == "psum" and predicate._st.buffer == "psum":
        _fail("select_reduce.psum", I, "predicate", "and on_true are both in PSUM; at most one may be")
    if predicate.dtype not in (_dt.int8, _dt.uint8, _dt.int16, _dt.uint16):
        _fail("select_reduce.dtype", I, "predicate", f"is {_dt.name(predicate.dtype)}; must be int8/uint8/int16/uint16")
    if _dt.is_tf32(on_true.dtype) or on_true.dtype in (_dt.int32, _dt.uint32):
        _fail("select_reduce.dtype", I, "on_true", f"is {_dt.name(on_true.dtype)}; tfloat32/int32/uint32 not allowed")
    red = _ops.binary(reduce_op, I, "reduce_op")
    if red.name != "maximum":
        _fail("select_reduce.reduce_op", I, "reduce_op", f"is {red.name}; only maximum is supported", "maximum")
    fv = _scalar_or_col(on_false, I, "on_false", p)
    if reduce_res is not None:
        pr, _, nr = _chk(reduce_res, I, "reduce_res")
        _same_p(I, "on_true", p, "reduce_res", pr)
        if nr != 1 or not _dt.is_float(reduce_res.dtype):
            _fail("select_reduce.reduce_res", I, "reduce_res", f"is {list(reduce_res.shape)} "
                 f"{_dt.name(reduce_res.dtype)}; must be a float [P,1] tile", "[P,1]")
    cmd = reduce_cmd if reduce_cmd is not None else globals()["reduce_cmd"].idle
    rc = type(cmd)
    if cmd is rc.load_reduce:
        _fail("reduce_cmd", I, "reduce_cmd", "load_reduce is not supported by select_reduce")
    pred = predicate._v.reshape(p, n) != 0
    if reverse_pred:
        pred = ~pred
    y = _np.where(pred, on_true._f32().reshape(p, n), fv if isinstance(fv, float) else fv.reshape(p, 1)).astype(_f32)
    _store(dst, y)
    row = _np.max(y, axis=1)
    regs = _state.dve_regs
    if cmd is rc.idle:
        out = row.reshape(p, 1)
    else:
        if cmd in (rc.reset, rc.reset_reduce):
            regs[pstart:pstart + p] = -_np.inf
        if cmd in (rc.reduce, rc.reset_reduce):
            regs[pstart:pstart + p] = _np.maximum(regs[pstart:pstart + p], row)
        out = regs[pstart:pstart + p].reshape(p, 1)
    if reduce_res is not None:
        _store(reduce_res, out)
    _emit("vector", I, (("dst", dst), ("predicate", predicate), ("on_true", on_true),
                       ("on_false", on_false if isinstance(on_false, _NkiTensor) else None),
                       ("reduce_res", reduce_res)), name)


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):
    """Within each 32-partition quadrant, dst partition i takes src partition shuffle_mask[i] (255 keeps dst)."""
    I = "nc_stream_shuffle"
    p, _, n = _chk(src, I, "src")
    pd, _, nd = _chk(dst, I, "dst")
    _same_f(I, "src", n, "dst", nd)
    if dst.dtype != src.dtype:
        _fail("shuffle.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; \"dst must have same data type as src\" "
              f"({_dt.name(src.dtype)})")
    mask = list(shuffle_mask)
    if len(mask) != 32:
        _fail("shuffle.mask", I, "shuffle_mask", f"has {len(mask)} entries", 32)
    x = src._f32().reshape(p, n)
    out = dst._f32().reshape(pd, n).copy()
    for q in range(0, pd, 32):
        for i, s in enumerate(mask):
            if s != 255 and q + i < pd and q + s < p:
                out[q + i] = x[q + s]
    _store(dst, out)
    _emit("vector", I, (("dst", dst), ("src", src)), name)


# ---------------------------------------------------------------------------------------------- GpSimd engine
def _affine_values(I, pattern, offset, channel_multiplier, p, n):
    pat = [(int(s), int(c)) for s, c in pattern]
    if len(pat) > 4:
        _fail("pattern.dims", I, "pattern", f"has {len(pat)} dims", 4)
    cnt = 1
    for _, c in pat:
        cnt *= c
    if cnt != n:
        _fail("pattern.count", I, "pattern", f"{pat} covers {cnt} elements but dst has {n} per partition", n)
    v = _np.full((p,) + tuple(c for _, c in pat), 0, _np.int64)
    v += int(offset) + _np.arange(p, dtype=_np.int64).reshape((p,) + (1,) * len(pat)) * int(channel_multiplier)
    for k, (s, c) in enumerate(pat):
        shp = [1] * (len(pat) + 1)
        shp[k + 1] = c
        v += _np.arange(c, dtype=_np.int64).reshape(shp) * s
    return v.reshape(p, n)


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """dst[c, w, z, y, x] = offset + c*channel_multiplier + w*sw + z*sz + y*sy + x*sx for the pattern
    [[sw, nw], [sz, nz], [sy, ny], [sx, nx]] (int32 math, cast to dst dtype); GpSimd, dst in SBUF. ``c`` counts
    the partitions of dst from 0 (``for channel_id in range(dst.shape[0])`` in the nki.isa.iota docs)."""
    I = "iota"
    p, _, n = _chk(dst, I, "dst", ("sbuf",))
    v = _affine_values(I, pattern, offset, channel_multiplier, p, n)
    v = v.astype(_np.int32)
    if dst.dtype.kind in "iu":
        dst._v[...] = v.reshape(dst.shape).astype(dst.dtype)
    else:
        _store(dst, v.astype(_f32))
    _emit("gpsimd", I, (("dst", dst),), name)


# affine_select predicates by (pattern, offset, channel_multiplier, partitions, free size, cmp): a pure function of
# the key (checked inputs: the same key passed _affine_values' checks before), reused by every causal-mask select
_PRED_CACHE = {}


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=_ops.BINARY["equal"],
                  offset=0, name=None):
    """dst = on_true_tile where cmp_op(a, 0) else on_false_value, a = offset + c*channel_multiplier +
    sum(index*stride over pattern) (as iota). GpSimd: dst and on_true_tile in SBUF."""
    I = "affine_select"
    cmp = _ops.binary(cmp_op, I, "cmp_op", allowed=_ops.OP_RULES["compare"])
    p, _, n = _tiles(I, ("dst", dst), ("on_true_tile", on_true_tile), allowed=("sbuf",))
    if isinstance(on_false_value, _NkiTensor) or not isinstance(on_false_value, (int, float, _np.floating,
                                                                                  _np.integer)):
        _fail("affine_select.on_false_value", I, "on_false_value", "must be an fp32 scalar")
    key = (tuple((int(st), int(c)) for st, c in pattern), int(offset), int(channel_multiplier), p, n, cmp.name)
    pred = _PRED_CACHE.get(key)
    if pred is None:
        a = _affine_values(I, pattern, offset, channel_multiplier, p, n)
        pred = cmp.fn(a.astype(_np.float64), 0.0) != 0
        pred.flags.writeable = False
        if len(_PRED_CACHE) >= 64:
            _PRED_CACHE.pop(next(iter(_PRED_CACHE)))
        _PRED_CACHE[key] = pred
    if dst.dtype == on_true_tile.dtype:
        src = on_true_tile._v.reshape(p, n)
        fv = _dt.cast(_np.array([on_false_value], _f32), dst.dtype)[0]
        dst._v[...] = _np.where(pred, src, fv).reshape(dst.shape)
    else:
        _store(dst, _np.where(pred, on_true_tile._f32().reshape(p, n), _f32(on_false_value)))
    _emit("gpsimd", I, (("dst", dst), ("on_true_tile", on_true_tile)), name)


def tensor_partition_reduce(dst, op, data, name=None):
    """Reduce across partitions on GpSimd: dst[1, F] = op over data's partitions (add, maximum, minimum, ...)."""
    I = "tensor_partition_reduce"
    opd = _ops.binary(op, I, allowed=_ops.OP_RULES["tensor_partition_reduce"])
    p, _, n = _chk(data, I, "data", ("sbuf",))
    pd, _, nd = _chk(dst, I, "dst", ("sbuf",))
    _same_f(I, "data", n, "dst", nd)
    if opd.reduce is None:
        _fail("reduce.op", I, "op", f"{opd.name} is not a reduction")
    x = data._f32().reshape(p, n).T
    _store(dst, _np.broadcast_to(opd.reduce(x, -1).reshape(1, n), (pd, n)))
    _emit("gpsimd", I, (("dst", dst), ("data", data)), name)


# ------------------------------------------------------------------------------------------------------ random
def rng(dst, engine=engine.unknown, name=None):
    """32 random bits per element truncated to dst's integer dtype. Vector engine only on NeuronCore-v2. The
    interpreter's PRNG (numpy PCG64) does not reproduce hardware bit streams."""
    I = "rng"
    _chk(dst, I, "dst")
    eng = _engine_name(engine, "vector")
    if eng != "vector" and _target.version() == 2:
        _fail("engine", I, "engine", f"{eng}: rng runs on the Vector engine only on NeuronCore-v2", "vector")
    if dst.dtype.kind not in "iu" or dst.dtype.itemsize > 4:
        _fail("rng.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must be an integer type (int8..uint32)")
    bits = _state.rng.integers(0, 2 ** 32, size=dst.shape, dtype=_np.uint64).astype(_np.uint32)
    dst._v[...] = bits.astype(dst.dtype)   # truncation of the 32-bit value
    _emit(eng, I, (("dst", dst),), name)


def set_rng_seed(src_seeds, name=None):
    """Seed the Vector engine PRNG from a [1,1] 32-bit tensor."""
    I = "set_rng_seed"
    _chk(src_seeds, I, "src_seeds", align=False)
    if src_seeds.size != 1 or src_seeds.dtype.itemsize != 4:
        _fail("rng.seed", I, "src_seeds", f"is {list(src_seeds.shape)} {_dt.name(src_seeds.dtype)}; must be a [1,1] "
             "32-bit tensor", "[1,1]")
    seed = int(src_seeds._v.reshape(-1).view(_np.uint32)[0]) if src_seeds.dtype.kind != "f" else \
        int(src_seeds._v.reshape(-1).view(_np.uint32)[0])
    _state.rng = _np.random.Generator(_np.random.PCG64(seed))
    _emit("vector", I, (("src_seeds", src_seeds),), name)


def dropout(dst, data, prob, name=None):
    """dst = data with each element zeroed with probability prob (scalar or [P,1]); no rescaling."""
    I = "dropout"
    p, _, n = _tiles(I, ("data", data), ("dst", dst))
    if dst.dtype != data.dtype:
        _fail("dropout.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    pr = _scalar_or_col(prob, I, "prob", p)
    u = _state.rng.random((p, n), dtype=_f32)
    keep = u >= (pr if isinstance(pr, float) else pr.reshape(p, 1))
    src = data._v.reshape(p, n)
    dst._v[...] = _np.where(keep, src, _np.zeros((), src.dtype)).reshape(dst.shape)
    _clear_mm(dst)
    _emit("vector", I, (("dst", dst), ("data", data)), name)


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):
    """dst = src where predicate != 0 (inverted by reverse_pred), dst unchanged elsewhere, on the Vector engine.
    src: a tile (same dtype as dst) or a number; predicate uint8/uint16/uint32; src and predicate not both in PSUM
    (nki.isa.tensor_copy_predicated)."""
    I = "tensor_copy_predicated"
    tiles = [("dst", dst), ("predicate", predicate)] + ([("src", src)] if isinstance(src, _NkiTensor) else [])
    p, _, n = _tiles(I, *tiles)
    if predicate.dtype not in (_dt.uint8, _dt.uint16, _dt.uint32):
        _fail("copy_predicated.dtype", I, "predicate", f"is {_dt.name(predicate.dtype)}; must be uint8/uint16/uint32")
    if isinstance(src, _NkiTensor):
        if src.dtype != dst.dtype:
            _fail("copy_predicated.dtype", I, "src", f"is {_dt.name(src.dtype)}; src and dst must share a dtype "
                  f"({_dt.name(dst.dtype)})")
        if src._st.buffer == "psum" and predicate._st.buffer == "psum":
            _fail("copy_predicated.psum", I, "src", "and predicate are both in PSUM; at most one may be")
        vals = src._v.reshape(p, n)
    elif isinstance(src, (bool, int, float, _np.integer, _np.floating)):
        vals = _dt.cast(_np.array(src, _f32), dst.dtype)
    else:
        _fail("operand.type", I, "src", f"must be a tile or a number, got {type(src).__name__}")
    pred = predicate._v.reshape(p, n) != 0
    if reverse_pred:
        pred = ~pred
    cur = dst._v.reshape(p, n)
    dst._v[...] = _np.where(pred, vals, cur).reshape(dst.shape)
    _clear_mm(dst)
    _emit("vector", I, (("dst", dst), ("src", src if isinstance(src, _NkiTensor) else None),
                        ("predicate", predicate)), name)


def tensor_scalar_cumulative(dst, src, op0, op1, imm0, imm1=None, reduce_cmd=reduce_cmd.reset_reduce, name=None):
    """Per partition, along the flattened free dims: ``reg = op1(op0(src[i], imm0), reg); dst[i] = reg`` on the
    Vector engine's accumulator registers (reset_reduce: reg = op1's identity (0 add/subtract, 1 multiply,
    -inf max, +inf min); reduce: keep; load_reduce: reg = imm1). op0 arithmetic; op1 add/subtract/multiply/
    maximum/minimum; no int32/uint32 data; imm0/imm1 fp32 scalars or [P,1] tiles
    (nki.isa.tensor_scalar_cumulative)."""
    I = "tensor_scalar_cumulative"
    o0 = _ops.binary(op0, I, "op0")
    o1 = _ops.binary(op1, I, "op1", allowed=_ops.OP_RULES["tensor_scalar_cumulative.op1"])
    if o0.kind == "bitvec":
        _fail("op.bitvec", I, "op0", f"{o0.name}: op0 must be arithmetic")
    p, pstart, n = _tiles(I, ("src", src), ("dst", dst))
    for role, t in (("src", src), ("dst", dst)):
        if t.dtype in (_dt.int32, _dt.uint32):
            _fail("cumulative.dtype", I, role, f"is {_dt.name(t.dtype)}; INT32/UINT32 are not supported")
    v0 = _scalar_or_col(imm0, I, "imm0", p)
    cmd = reduce_cmd
    if cmd not in (_RC.reset_reduce, _RC.reduce, _RC.load_reduce):
        _fail("reduce_cmd", I, "reduce_cmd", f"{cmd!r}: supported are reset_reduce, reduce, load_reduce")
    regs = _state.dve_regs
    if cmd is _RC.reset_reduce:
        regs[pstart:pstart + p] = 0.0 if o1.name == "subtract" else o1.identity
    elif cmd is _RC.load_reduce:
        if imm1 is None:
            _fail("reduce_init", I, "imm1", "is required with reduce_cmd=load_reduce")
        v1 = _scalar_or_col(imm1, I, "imm1", p)
        regs[pstart:pstart + p] = v1.reshape(-1) if isinstance(v1, _np.ndarray) else v1
    x = _np.asarray(_scalar_op(o0, src._f32().reshape(p, n), v0, False), _f32)
    out = _np.empty((p, n), _f32)
    reg = regs[pstart:pstart + p].copy()
    with _np.errstate(all="ignore"):
        for i in range(n):
            reg = o1.fn(x[:, i], reg).astype(_f32)
            out[:, i] = reg
    regs[pstart:pstart + p] = reg
    _store(dst, out)
    _emit("vector", I, (("dst", dst), ("src", src)), name)


def _vector_unary(dst, op, data):
    """An nl unary wrapper outside the activation table (cos, tan, floor, ceil, trunc, negative): one Vector
    instruction computing ``op`` in fp32 (interpreter's choice: the docs do not name the engine)."""
    I = "tensor_scalar"
    p, _, n = _tiles(I, ("data", data), ("dst", dst))
    _store(dst, op.unary(data._f32().reshape(p, n)))
    _emit("vector", I, (("dst", dst), ("data", data)), op.name)


# ---------------------------------------------------------------------------------------------- registers
def register_alloc(x=None):
    """A new VirtualRegister, holding ``x`` (an int) when given."""
    if x is not None and not isinstance(x, (int, _np.integer)):
        _fail("register.value", "register_alloc", "x", f"must be an int or None, got {type(x).__name__}")
    return VirtualRegister(x)


def register_move(dst, src):
    """dst = src (a compile-time int or another VirtualRegister)."""
    if not isinstance(dst, VirtualRegister):
        _fail("register.type", "register_move", "dst", f"must be a VirtualRegister, got {type(dst).__name__}")
    if isinstance(src, VirtualRegister):
        dst._value = src._get("register_move")
    elif isinstance(src, (int, _np.integer)):
        dst._value = int(src)
    else:
        _fail("register.value", "register_move", "src", f"must be an int or a VirtualRegister, got "
              f"{type(src).__name__}")


def register_load(dst, src):
    """dst = the 32-bit value of the one-element SBUF/HBM tensor ``src``."""
    I = "register_load"
    if not isinstance(dst, VirtualRegister):
        _fail("register.type", I, "dst", f"must be a VirtualRegister, got {type(dst).__name__}")
    _tensor(src, I, "src")
    if src.size != 1 or src.dtype.itemsize > 4 or src._st.buffer == "psum":
        _fail("register.src", I, "src", f"is {list(src.shape)} {_dt.name(src.dtype)} in {src._st.buffer}; must be a "
              "one-element tensor of at most 32 bits in SBUF or HBM")
    v = src._v.reshape(-1)[0]
    dst._value = int(v) if src.dtype.kind in "iub" else int(_np.float32(v))
    _emit("sync", I, (("src", src),))


def register_store(dst, src):
    """The one-element SBUF/HBM tensor ``dst`` = the value of VirtualRegister ``src``."""
    I = "register_store"
    _tensor(dst, I, "dst")
    if not isinstance(src, VirtualRegister):
        _fail("register.type", I, "src", f"must be a VirtualRegister, got {type(src).__name__}")
    if dst.size != 1 or dst.dtype.itemsize > 4 or dst._st.buffer == "psum":
        _fail("register.dst", I, "dst", f"is {list(dst.shape)} {_dt.name(dst.dtype)} in {dst._st.buffer}; must be a "
              "one-element tensor of at most 32 bits in SBUF or HBM")
    dst._v[...] = _dt.cast(_np.array(src._get(I)), dst.dtype) if dst.dtype.kind == "f" else \
        _np.array(src._get(I)).astype(dst.dtype)
    _emit("sync", I, (("dst", dst),))


from ._gather import (local_gather, nc_n_gather, nc_find_index8, nc_match_replace8,  # noqa: E402,F401
                      sequence_bounds)
from ._newer import (activate2, exponential, nc_matmul_mx, quantize_mx, rand2, range_select,  # noqa: E402,F401
                     rand_get_state, rand_set_state, core_barrier, sendrecv, nonzero_with_count, topk)
