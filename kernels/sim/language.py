"""``nki.language`` for the interpreter: dtypes, memory regions, tile sizes, allocation, load/store, the
``nl`` elementwise/reduction wrappers (implemented through the same ``isa`` instructions, so they are checked and
traced), SPMD ids, ``device_print`` and the loop constructs. Only official NKI 0.6 names are public here
(tests/test_sim_api.py holds this module against tests/nki_api_table.py)."""
import contextlib as _contextlib
import inspect as _inspect

import numpy as _np

from . import dtypes as _dt
from . import isa as _isa
from . import ops as _ops
from . import memory as _memory
from .errors import ConstraintError as _ConstraintError
from .objects import NKIObject, MemoryRegion
from .tensor import NkiTensor, DynSlice as _DynSlice, allocate as _allocate, from_numpy as _from_numpy

# ------------------------------------------------------------------------------------------------- dtypes
# Official: ``DType = str`` and the dtypes are names. Here a dtype is a numpy dtype (bf16/fp8 through ml_dtypes),
# which compares equal to its name (``nl.float32 == "float32"``); ``nl.DType`` is that type.
DType = _np.dtype
float32 = _dt.float32
tfloat32 = _dt.tfloat32
float16 = _dt.float16
bfloat16 = _dt.bfloat16
float8_e4m3 = _dt.float8_e4m3
float8_e4m3fn = _dt.float8_e4m3fn
float8_e5m2 = _dt.float8_e5m2
float8_e8m0fnu = _dt.float8_e8m0fnu
float8_e5m2_x4 = _dt.float8_e5m2_x4
float8_e4m3fn_x4 = _dt.float8_e4m3fn_x4
float4_e2m1fn_x4 = _dt.float4_e2m1fn_x4
int8, int16, int32 = _dt.int8, _dt.int16, _dt.int32
uint8, uint16, uint32 = _dt.uint8, _dt.uint16, _dt.uint32
bool_ = _dt.bool_


# ------------------------------------------------------------------------------------------------ buffers
sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
private_hbm = MemoryRegion.private_hbm
shared_hbm = MemoryRegion.shared_hbm
hbm = private_hbm


def _region(buffer):
    b = buffer.buffer if isinstance(buffer, NkiTensor) else buffer
    if isinstance(b, MemoryRegion):
        return b.value
    if isinstance(b, str) and b in ("sbuf", "psum", "hbm", "private_hbm", "shared_hbm"):
        return b
    raise TypeError(f"{buffer!r} is not an nl memory region (nl.sbuf, nl.psum, nl.hbm, nl.shared_hbm)")


def is_hbm(buffer):
    """Whether ``buffer`` is any HBM region."""
    return _region(buffer) in ("hbm", "private_hbm", "shared_hbm")


def is_on_chip(buffer):
    """Whether ``buffer`` is on chip (SBUF or PSUM)."""
    return _region(buffer) in ("sbuf", "psum")


def is_psum(buffer):
    return _region(buffer) == "psum"


def is_sbuf(buffer):
    return _region(buffer) == "sbuf"


class tile_size(NKIObject):
    """Hardware tile size constants of NeuronCore-v2 (trn1), attributes as the nki.language.tile_size page lists
    them. SBUF: 192 KiB per partition of which 176 KiB are usable (16 KiB compiler-reserved, spec 3.1), so
    ``sbuf_size_bytes`` (total, all partitions) is 128 x 192 KiB and ``sbuf_fmax_bytes`` (usable per partition)
    176 KiB; the alignment values are the interpreter's assumption (the page gives no number)."""
    pmax = 128
    psum_fmax = 512
    psum_fmax_bytes = 2048
    psum_num_banks = 8
    sbuf_size_bytes = 128 * 192 * 1024
    sbuf_fmax_bytes = _memory.SBUF_BYTES_PER_PARTITION
    sbuf_fmax = _memory.SBUF_BYTES_PER_PARTITION // 4
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    bn_stats_fmax = 512
    psum_min_align = 4
    sbuf_min_align = 4
    total_available_sbuf_size = _memory.SBUF_BYTES_PER_PARTITION   # deprecated alias of sbuf_fmax_bytes


# ------------------------------------------------------------------------------------------------ allocation
def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    """New tensor, uninitialised (NaN for floats, 4 for ints as the official simulator). ``address=(partition,
    byte_offset)`` places an SBUF/PSUM tile at that address: tiles whose address ranges overlap share the bytes,
    and capacity counts the union of the placed ranges (kernels.sim.memory)."""
    if address is not None:
        return _allocate_at(shape, dtype, buffer, name, address)
    return _allocate(shape, dtype, buffer, name)


def _allocate_at(shape, dtype, buffer, name, address):
    from .tensor import allocate_at
    return allocate_at(shape, dtype, buffer, name, address)


def _filled(shape, dtype, buffer, name, value):
    t = _allocate(shape, dtype, buffer, name)
    if t._onchip:
        _isa.memset(t, int(value) if t.dtype.kind in "iub" else float(value))
    else:
        t._v[...] = _dt.cast(_np.array(value, _np.float32), t.dtype)
    return t


def zeros(shape, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, 0)


def ones(shape, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, 1)


def full(shape, fill_value, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, fill_value)


def zeros_like(x, dtype=None, buffer=None, name=""):
    return zeros(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def empty_like(x, dtype=None, buffer=None, name=""):
    return ndarray(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def shared_constant(constant):
    """A shared_hbm tensor holding a numpy array (or the contents of a .npy path), of the array's dtype."""
    arr = _np.load(constant) if isinstance(constant, str) else _np.asarray(constant)
    return _from_numpy(_np.array(arr), "shared_hbm", "shared_constant")


def shared_identity_matrix(n, dtype=uint8, dst=None):
    """An [n, n] identity matrix in SBUF."""
    t = dst if dst is not None else ndarray((n, n), dtype, sbuf, "identity")
    _isa.memset(t, 0 if t.dtype.kind in "iub" else 0.0)
    _isa.affine_select(t, [[-1, n]], 1, _filled_tile_for_identity(t), 0.0, cmp_op=equal, offset=0)
    return t


def _filled_tile_for_identity(t):
    ones_t = ndarray(t.shape, t.dtype, sbuf, "identity_ones")
    _isa.memset(ones_t, 1 if t.dtype.kind in "iub" else 1.0)
    return ones_t


def ds(start, size):
    """Dynamic slice ``start:start+size``."""
    return _DynSlice(start, size)


# ------------------------------------------------------------------------------------------------ DMA
def load(src, dtype=None):
    """Copy an HBM tensor into a new SBUF tile of the same shape (dim 0 -> partitions)."""
    if src._onchip:
        raise _ConstraintError(f"rule buffer: load operand 'src' is in {src.buffer}; nl.load reads HBM")
    shape = src.shape if len(src.shape) >= 2 else (src.shape[0], 1)
    t = ndarray(shape, dtype or src.dtype, sbuf, f"load_{src.name}")
    _isa.dma_copy(t, src)
    return t


def store(dst, value):
    """Copy an SBUF tile into an HBM tensor."""
    if value._st.buffer != "sbuf":
        raise _ConstraintError(f"rule buffer: store operand 'value' is in {value.buffer}; must be in sbuf "
                              f"(copy PSUM to SBUF with nisa.tensor_copy first)")
    _isa.dma_copy(dst, value)


def _copy_wrapper(op, x, dtype=None):
    """nl.copy(x): a new tile in x's buffer (SBUF or PSUM) by the Scalar engine's activation(op=copy), as the
    docs describe (fp32 internally)."""
    t = ndarray(x.shape, dtype or x.dtype, x.buffer, "copy")
    _isa.activation(t, copy, x)
    return t


def load_transpose2d(src, dtype=None):
    """DMA-transpose a 2-D HBM tensor into SBUF (slow on hardware; prefer load + nc_transpose)."""
    a, b = src.shape
    t = ndarray((b, a), dtype or src.dtype, sbuf, "load_transpose2d")
    _isa.dma_copy(t, src.permute((1, 0)))
    return t


# ------------------------------------------------------------------------------------------------ wrappers
def _promote(a, b):
    if a == b:
        return a
    fa, fb = _dt.is_float(a), _dt.is_float(b)
    if fa and not fb:
        return a
    if fb and not fa:
        return b
    if fa and fb:
        if {a, b} == {float16, bfloat16}:
            return float32
        return a if a.itemsize >= b.itemsize else b
    return a if a.itemsize >= b.itemsize else b


def _binary_wrapper(op, x, y, dtype=None):
    if isinstance(x, NkiTensor) and isinstance(y, NkiTensor):
        if x.shape == y.shape or x._free() == y._free():
            out = ndarray(x.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_tensor(out, x, y, op)
            return out
        if y._free() == 1:
            out = ndarray(x.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_scalar(out, x, op, y)
            return out
        if x._free() == 1:
            out = ndarray(y.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_scalar(out, y, op, x, reverse0=True)
            return out
        raise _ConstraintError(f"rule broadcast: nl.{op.name} operand 'y' shape {list(y.shape)} does not match x "
                               f"{list(x.shape)} (no broadcasting except [P,1] operands)")
    if isinstance(x, NkiTensor):
        out = ndarray(x.shape, dtype or x.dtype, sbuf, op.name)
        _isa.tensor_scalar(out, x, op, y)
        return out
    if isinstance(y, NkiTensor):
        out = ndarray(y.shape, dtype or y.dtype, sbuf, op.name)
        _isa.tensor_scalar(out, y, op, x, reverse0=True)
        return out
    return op.fn(_np.float32(x), _np.float32(y))


def _unary_wrapper(op, x, dtype=None):
    """Activation-table functions run on the Scalar engine; the rest (cos, tan, floor, ceil, trunc, negative) as
    one Vector instruction (the docs do not say which engine the nl wrapper uses for them)."""
    out = ndarray(x.shape, dtype or x.dtype, sbuf, op.name)
    if op.name in _ops.OP_RULES["activation"]:
        _isa.activation(out, op, x)
    else:
        _isa._vector_unary(out, op, x)
    return out


def _rsqrt_wrapper(op, x, dtype=None):
    # NKI >= 0.5 runs nl.rsqrt on the GpSimd engine, which cannot access PSUM.
    from .engines import onchip, emit
    onchip(x, "rsqrt", "x", ("sbuf",))
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "rsqrt")
    with _np.errstate(all="ignore"):
        out._write(_np.float32(1.0) / _np.sqrt(x._f32()))
    emit("gpsimd", "rsqrt", (("dst", out), ("data", x)))
    return out


_SIG_BINARY = _inspect.signature(lambda x, y, dtype=None: None)
_SIG_UNARY = _inspect.signature(lambda x, dtype=None: None)

for _name, _op in _ops.BINARY.items():
    _op.wrapper = _binary_wrapper
    _op.__signature__ = _SIG_BINARY
    globals()[_name] = _op
for _name, _op in _ops.UNARY.items():
    _op.wrapper = {"rsqrt": _rsqrt_wrapper, "copy": _copy_wrapper}.get(_name, _unary_wrapper)
    _op.__signature__ = _SIG_UNARY
    globals()[_name] = _op
bypass = _ops.BYPASS
average = _ops.AVERAGE
del _name, _op


def _reduce_shape(x, axes, keepdims):
    if keepdims:
        return tuple(1 if d in axes else s for d, s in enumerate(x.shape))
    shape = tuple(s for d, s in enumerate(x.shape) if d not in axes)
    return shape + (1,) * (2 - len(shape)) if len(shape) < 2 else shape


def _axes(x, axis):
    return [int(a) % x.ndim for a in (axis if isinstance(axis, (list, tuple)) else [axis])]


class _Reduction:
    """nl.sum/max/min/prod/mean/var(x, axis, dtype=None, keepdims=False): a function, not an ALU operator (passing
    it as ``op=`` is refused, except where a page names it: tensor_scalar_reduce's "nl.max or nl.min")."""

    def __init__(self, name, op_name, post=None, always_keepdims=False):
        self.name, self.op_name, self.post, self.always_keepdims = name, op_name, post, always_keepdims

    def __repr__(self):
        return f"nl.{self.name}"

    def __call__(self, x, axis, dtype=None, keepdims=False):
        axes = _axes(x, axis)
        out = ndarray(_reduce_shape(x, axes, keepdims or self.always_keepdims), dtype or x.dtype, sbuf, self.name)
        if self.post is None:
            _isa.tensor_reduce(out, _ops.BINARY[self.op_name], x, axes, keepdims=keepdims)
        else:
            self.post(out, x, axes)
        return out


def _mean(out, x, axes):
    tmp = ndarray(out.shape, float32, sbuf, "mean_sum")
    _isa.tensor_reduce(tmp, add, x, axes)
    n = 1
    for a in axes:
        n *= x.shape[a]
    _isa.tensor_scalar(out, tmp, multiply, 1.0 / n)


def _var(out, x, axes):
    """Population variance over axes: mean((x - mean(x))^2), all in fp32."""
    mshape = tuple(1 if d in axes else s for d, s in enumerate(x.shape))
    m = ndarray(mshape, float32, sbuf, "var_mean")
    _mean(m, x, axes)
    centered = ndarray(x.shape, float32, sbuf, "var_centered")
    _isa.tensor_tensor(centered, x, m._broadcast_to(x.shape), subtract)
    sq = ndarray(x.shape, float32, sbuf, "var_sq")
    _isa.tensor_tensor(sq, centered, centered, multiply)
    _mean(out, sq, axes)


sum = _Reduction("sum", "add")
max = _Reduction("max", "maximum")
min = _Reduction("min", "minimum")
prod = _Reduction("prod", "multiply")
mean = _Reduction("mean", "add", post=_mean)
# nl.var: "keepdims: currently ignored; result always has keepdims=True shape"
var = _Reduction("var", "add", post=_var, always_keepdims=True)


def all(x, axis, dtype=None):
    """Logical AND over the free ``axis`` (1.0 where every element is non-zero)."""
    axes = _axes(x, axis)
    out = ndarray(_reduce_shape(x, axes, False), dtype or x.dtype, sbuf, "all")
    _isa.tensor_reduce(out, logical_and, x, axes)
    return out


def matmul(x, y, transpose_x=False):
    """x @ y (or x.T @ y with transpose_x=True) into a new fp32 PSUM tile."""
    if not transpose_x:
        xt_ps = ndarray((x._free(), x.shape[0]), x.dtype, psum, "matmul_xT")
        _isa.nc_transpose(xt_ps, x)
        xt = ndarray(xt_ps.shape, x.dtype, sbuf, "matmul_xT_sb")
        _isa.tensor_copy(xt, xt_ps)
        x = xt
    out = ndarray((x._free(), y._free()), float32, psum, "matmul")
    _isa.nc_matmul(out, x, y)
    return out


def transpose(x, dtype=None):
    """2-D transpose on the Tensor engine into a new PSUM tile (PSUM keeps x's dtype, as nc_transpose requires;
    ``dtype`` converts on a Vector copy to SBUF)."""
    out = ndarray((x._free(), x.shape[0]), x.dtype, psum, "transpose")
    _isa.nc_transpose(out, x)
    if dtype is not None and _dt.normalize(dtype) != x.dtype:
        sb = ndarray(out.shape, dtype, sbuf, "transpose_cast")
        _isa.tensor_copy(sb, out)
        return sb
    return out


# ------------------------------------------------------------------------------------------------ SPMD
class _Grid:
    ids = ()
    dims = ()


_grid = _Grid()


def program_id(axis=0):
    """Index of this kernel instance (0, or 0/1 under ``kernel[2]`` with LNC=2 on trn2+)."""
    if not _grid.dims:
        return 0
    return _grid.ids[axis]


def num_programs(axes=0):
    if not _grid.dims:
        return 1
    if isinstance(axes, (list, tuple)):
        n = 1
        for a in axes:
            n *= _grid.dims[a]
        return n
    return _grid.dims[axes]


def program_ndim():
    return len(_grid.dims)


def device_print(print_prefix, tensor):
    """Print a tensor (SBUF/PSUM/HBM) to stdout, as the official simulator does."""
    print(print_prefix, _np.array(tensor._v) if isinstance(tensor, NkiTensor) else tensor, flush=True)


# ------------------------------------------------------------------------------------------------ loops
def affine_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def sequential_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def static_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def _bound(v, what):
    if isinstance(v, _isa.VirtualRegister):
        return v._get(what)
    if isinstance(v, NkiTensor):
        raise _ConstraintError(f"rule loop.bound: {what} bound is a tensor; load it into a register with "
                               "nisa.register_load first")
    return int(v)


def dynamic_range(start, stop=None, step=1):
    """(Deprecated by fori_loop in 0.6.) A device loop whose bounds may be VirtualRegisters; executed eagerly."""
    if stop is None:
        start, stop = 0, start
    if isinstance(step, _isa.VirtualRegister) or int(step) <= 0:
        raise _ConstraintError("rule loop.step: dynamic_range step must be a compile-time positive integer")
    return range(_bound(start, "dynamic_range"), _bound(stop, "dynamic_range"), int(step))


def fori_loop(lower, upper, body_fun, step=1):
    """Run ``body_fun(i)`` for i in range(lower, upper, step); ``i`` is a VirtualRegister holding the iteration
    value (read it as a scalar_offset or through register_store), as on the device."""
    if isinstance(step, _isa.VirtualRegister) or int(step) <= 0:
        raise _ConstraintError("rule loop.step: fori_loop step must be a compile-time positive integer")
    for i in range(_bound(lower, "fori_loop"), _bound(upper, "fori_loop"), int(step)):
        body_fun(_isa.VirtualRegister(i))


def while_loop(init, body_fun):
    """``r = init; while r != 0: r = body_fun(r)`` with ``r`` a VirtualRegister (the loop's condition)."""
    r = init
    if not isinstance(r, _isa.VirtualRegister):
        raise _ConstraintError("rule loop.condition: while_loop init must be a VirtualRegister "
                               "(nisa.register_alloc)")
    while r._get("while_loop") != 0:
        r = body_fun(r)
        if not isinstance(r, _isa.VirtualRegister):
            raise _ConstraintError("rule loop.condition: while_loop body_fun must return the next condition "
                                   "VirtualRegister")


@_contextlib.contextmanager
def no_reorder():
    yield


# ------------------------------------------------------------------------------------------------ more wrappers
def expand_dims(x, axis):
    """View of x with a size-1 dim inserted at ``axis``."""
    return x.expand_dim(axis)


def broadcast_to(x, shape, dtype=None):
    """x broadcast along its size-1 dims to ``shape`` (same rank), as numpy. Free dims: a Vector copy of a
    stride-0 view. The partition dim (size 1 -> P): TensorE, ``ones[1, P].T @ x[1, F]`` into fp32 PSUM (exact:
    one product by 1.0 per element), 512 columns at a time, then a Vector copy to SBUF."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != x.ndim:
        raise ValueError(f"nl.broadcast_to: shape {shape} must have the rank of x {x.shape}")
    for a, b in zip(x.shape, shape):
        if a != b and a != 1:
            raise ValueError(f"nl.broadcast_to: cannot broadcast {x.shape} to {shape} (dims must match or be 1)")
    if shape == tuple(x.shape) and (dtype is None or _dt.normalize(dtype) == x.dtype):
        return x
    out = ndarray(shape, dtype or x.dtype, sbuf, "broadcast_to")
    if x._onchip and shape[0] != x.shape[0]:
        _broadcast_partitions(out, x)
    else:
        _isa.tensor_copy(out, x._broadcast_to(shape))
    return out


def _broadcast_partitions(out, x):
    p = out.shape[0]
    row = x._broadcast_to((1,) + out.shape[1:])
    n = row._free()
    mm_dtype = x.dtype if x.dtype in (float32, bfloat16, float16) else float32
    src = ndarray((1, n), mm_dtype, sbuf, "broadcast_row")
    _isa.tensor_copy(src, row.reshape((1, n)) if row.is_contiguous() else _copy_row(row, n, mm_dtype))
    ones_t = ndarray((1, p), mm_dtype, sbuf, "broadcast_ones")
    _isa.memset(ones_t, 1.0)
    flat_out = out.reshape((p, n))
    for c0 in range(0, n, 512):
        w = 512 if n - c0 > 512 else n - c0
        ps = ndarray((p, w), float32, psum, "broadcast_ps")
        _isa.nc_matmul(ps, ones_t, src[:, c0:c0 + w], accumulate=False)
        _isa.tensor_copy(flat_out[:, c0:c0 + w], ps)


def _copy_row(row, n, dtype):
    t = ndarray(row.shape, dtype, sbuf, "broadcast_row_c")
    _isa.tensor_copy(t, row)
    return t.reshape((1, n))


def logical_not(x, dtype=None):
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "logical_not")
    _isa.tensor_scalar(out, x, equal, 0.0)
    return out


def invert(x, dtype=None):
    """Bitwise NOT of an integer tile (XOR with all ones)."""
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "invert")
    _isa.tensor_scalar(out, x, bitwise_xor, -1)
    return out


def gather_flattened(data, indices, axis=0, dtype=None):
    """Per partition, ``out[p, j] = data[p, :].flatten()[indices[p, j]]`` (nisa.nc_n_gather on GpSimd; the
    0.6 docs: nc_n_gather "used to be nl.gather_flattened")."""
    if axis != 0:
        raise _ConstraintError(f"rule gather.axis: gather_flattened axis={axis}; the interpreter gathers along the "
                               "flattened free dims (axis=0) only")
    out = ndarray(indices.shape, data.dtype, sbuf, "gather_flattened")
    _isa.nc_n_gather(out, data, indices)
    if dtype is not None and _dt.normalize(dtype) != data.dtype:
        cast = ndarray(indices.shape, dtype, sbuf, "gather_flattened_cast")
        _isa.tensor_copy(cast, out)
        return cast
    return out


def random_seed(seed):
    """Seed the random numbers of nl.rand / nl.dropout from a [1,1] 32-bit tile (nisa.set_rng_seed)."""
    _isa.set_rng_seed(seed)


def where(condition, x, y, dtype=None):
    """x where condition (a 1.0/0.0 tile) is non-zero, else y; x/y tiles or scalars. Computed as
    y + condition * (x - y) with Vector instructions when both are tiles (exact for finite values)."""
    ref = condition
    out = ndarray(ref.shape, dtype or (x.dtype if isinstance(x, NkiTensor) else
                                       y.dtype if isinstance(y, NkiTensor) else float32), sbuf, "where")
    if isinstance(x, NkiTensor) and isinstance(y, NkiTensor):
        diff = ndarray(ref.shape, float32, sbuf, "where_diff")
        _isa.tensor_tensor(diff, x, y, subtract)
        _isa.tensor_tensor(diff, diff, condition, multiply)
        _isa.tensor_tensor(out, diff, y, add)
    elif isinstance(x, NkiTensor):        # y scalar: (x - y) * cond + y
        diff = ndarray(ref.shape, float32, sbuf, "where_diff")
        _isa.tensor_scalar(diff, x, subtract, float(y))
        _isa.scalar_tensor_tensor(out, diff, multiply, 1.0, multiply, condition)
        _isa.tensor_scalar(out, out, add, float(y))
    elif isinstance(y, NkiTensor):        # x scalar: y - (y - x) * cond
        diff = ndarray(ref.shape, float32, sbuf, "where_diff")
        _isa.tensor_scalar(diff, y, subtract, float(x))
        _isa.tensor_tensor(diff, diff, condition, multiply)
        _isa.tensor_tensor(out, y, diff, subtract)
    else:
        _isa.tensor_scalar(out, condition, multiply, float(x) - float(y), op1=add, operand1=float(y))
    return out


def softmax(x, axis=-1, dtype=None):
    """softmax over the last free dim of a 2-D tile, in fp32: exp(x - max) / sum."""
    if x.ndim != 2 or axis not in (-1, 1):
        raise ValueError("nl.softmax: the interpreter supports 2-D tiles with axis=-1")
    p = x.shape[0]
    m = ndarray((p, 1), float32, sbuf, "softmax_max")
    _isa.tensor_reduce(m, maximum, x, 1, negate=True)
    e = ndarray(x.shape, float32, sbuf, "softmax_exp")
    s = ndarray((p, 1), float32, sbuf, "softmax_sum")
    _isa.activation_reduce(e, exp, x, add, s, bias=m)
    r = ndarray((p, 1), float32, sbuf, "softmax_rsum")
    _isa.reciprocal(r, s)
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "softmax")
    _isa.tensor_scalar(out, e, multiply, r)
    return out


def dropout(x, rate, dtype=None):
    """Zero each element with probability ``rate`` (no rescaling), on the Vector engine."""
    out = ndarray(x.shape, x.dtype, sbuf, "dropout")
    _isa.dropout(out, x, rate)
    if dtype is not None and _dt.normalize(dtype) != x.dtype:
        return copy(out, dtype)
    return out




def rms_norm(x, w, axis, n, epsilon=1e-06, dtype=None, compute_dtype=None):
    """x / sqrt(sum(x^2, axis) / n + epsilon) * w (fp32 math); w broadcasts over the partitions only if it already
    has x's partition count."""
    axes = [int(a) % x.ndim for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
    sq = ndarray(x.shape, float32, sbuf, "rms_sq")
    _isa.tensor_tensor(sq, x, x, multiply)
    rshape = tuple(1 if d in axes else s for d, s in enumerate(x.shape))
    ss = ndarray(rshape, float32, sbuf, "rms_sum")
    _isa.tensor_reduce(ss, add, sq, axes)
    _isa.tensor_scalar(ss, ss, multiply, 1.0 / n, op1=add, operand1=float(epsilon))
    r = ndarray(rshape, float32, sbuf, "rms_rstd")
    _isa.activation(r, rsqrt, ss)
    y = ndarray(x.shape, float32, sbuf, "rms_xhat")
    _isa.tensor_tensor(y, x, r._broadcast_to(x.shape), multiply)
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "rms_norm")
    _isa.tensor_tensor(out, y, w._broadcast_to(x.shape) if w.shape != x.shape else w, multiply)
    return out


def rand(shape, dtype, buffer=sbuf, name=""):
    """Uniform random values in [0, 1) from the Vector engine PRNG (32 random bits scaled by 2^-32)."""
    bits = ndarray(shape, uint32, buffer, name + "_bits" if name else "rand_bits")
    _isa.rng(bits)
    out = ndarray(shape, dtype, buffer, name or "rand")
    _isa.tensor_scalar(out, bits, multiply, 2.0 ** -32)
    return out


