"""``nki.language`` for the interpreter: dtypes, buffers, tile sizes, allocation, load/store, the experimental
elementwise/reduction wrappers (implemented through the same ``isa`` instructions, so they are checked and traced),
SPMD ids, ``device_print`` and the loop aliases."""
import contextlib

import numpy as np

from . import dtypes as _dt
from . import isa as _isa
from . import ops as _ops
from .errors import ConstraintError
from .tensor import NkiTensor, DynSlice, allocate as _allocate, from_numpy as _from_numpy

# ------------------------------------------------------------------------------------------------- dtypes
float32 = _dt.float32
tfloat32 = _dt.tfloat32
float16 = _dt.float16
bfloat16 = _dt.bfloat16
float8_e4m3 = _dt.float8_e4m3
float8_e4m3fn = _dt.float8_e4m3fn
float8_e5m2 = _dt.float8_e5m2
int8, int16, int32 = _dt.int8, _dt.int16, _dt.int32
uint8, uint16, uint32 = _dt.uint8, _dt.uint16, _dt.uint32
bool_ = _dt.bool_

# ------------------------------------------------------------------------------------------------ buffers
sbuf = "sbuf"
psum = "psum"
hbm = "hbm"
private_hbm = "private_hbm"
shared_hbm = "shared_hbm"

tensor = NkiTensor
NkiTensor = NkiTensor


class tile_size:
    """Hardware tile limits of NeuronCore-v2. sbuf_* values are the interpreter's (trn1 usable 176 KiB per
    partition); the official values of psum_min_align/sbuf_min_align are not documented."""
    pmax = 128
    psum_fmax = 512
    psum_bank_fmax = 512
    psum_bank_fmax_bytes = 2048
    psum_num_banks = 8
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    bn_stats_fmax = 512
    sbuf_fmax_bytes = 176 * 1024
    sbuf_fmax = 176 * 1024 // 4
    sbuf_size_bytes = 176 * 1024
    total_available_sbuf_size = 176 * 1024


# ------------------------------------------------------------------------------------------------ allocation
def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    """New tensor, uninitialised (NaN for floats, 4 for ints as the official simulator)."""
    return _allocate(shape, dtype, buffer, name)


def _filled(shape, dtype, buffer, name, value):
    t = _allocate(shape, dtype, buffer, name)
    if t.onchip:
        _isa.memset(t, int(value) if t.dtype.kind in "iub" else float(value))
    else:
        t.np[...] = _dt.cast(np.array(value, np.float32), t.dtype)
    return t


def zeros(shape, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, 0)


def ones(shape, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, 1)


def full(shape, fill_value, dtype, buffer=sbuf, name=""):
    return _filled(shape, dtype, buffer, name, fill_value)


def zeros_like(x, dtype=None, buffer=None, name=""):
    return zeros(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def ones_like(x, dtype=None, buffer=None, name=""):
    return ones(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def full_like(x, fill_value, dtype=None, buffer=None, name=""):
    return full(x.shape, fill_value, dtype or x.dtype, buffer or x.buffer, name)


def empty_like(x, dtype=None, buffer=None, name=""):
    return ndarray(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def shared_constant(constant, dtype=None):
    """A shared_hbm tensor holding a numpy array (or the contents of a .npy path)."""
    arr = np.load(constant) if isinstance(constant, str) else np.asarray(constant)
    if dtype is not None:
        arr = arr.astype(_dt.normalize(dtype))
    return _from_numpy(np.array(arr), "shared_hbm", "shared_constant")


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


def par_dim(n):
    """Legacy marker of the partition dim in a shape; dim 0 is always the partition dim in NKI >= 0.3."""
    return n


def ds(start, size, step=1):
    """Dynamic slice ``start:start+size``."""
    return DynSlice(start, size, step)


# ------------------------------------------------------------------------------------------------ DMA
def load(src, dtype=None):
    """Copy an HBM tensor into a new SBUF tile of the same shape (dim 0 -> partitions)."""
    if src.buffer in ("sbuf", "psum"):
        raise ConstraintError(f"rule buffer: load operand 'src' is in {src.buffer}; nl.load reads HBM")
    shape = src.shape if len(src.shape) >= 2 else (src.shape[0], 1)
    t = ndarray(shape, dtype or src.dtype, sbuf, f"load_{src.name}")
    _isa.dma_copy(t, src)
    return t


def store(dst, value):
    """Copy an SBUF tile into an HBM tensor."""
    if value.buffer != "sbuf":
        raise ConstraintError(f"rule buffer: store operand 'value' is in {value.buffer}; must be in sbuf "
                              f"(copy PSUM to SBUF with nisa.tensor_copy first)")
    _isa.dma_copy(dst, value)


def copy(x, dtype=None):
    """Copy a tile into a new SBUF tile (Vector tensor_copy)."""
    t = ndarray(x.shape, dtype or x.dtype, sbuf, "copy")
    _isa.tensor_copy(t, x)
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
        if x.shape == y.shape or x.free_size() == y.free_size():
            out = ndarray(x.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_tensor(out, x, y, op)
            return out
        if y.free_size() == 1:
            out = ndarray(x.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_scalar(out, x, op, y)
            return out
        if x.free_size() == 1:
            out = ndarray(y.shape, dtype or _promote(x.dtype, y.dtype), sbuf, op.name)
            _isa.tensor_scalar(out, y, op, x, reverse0=True)
            return out
        raise ConstraintError(f"rule broadcast: nl.{op.name} operand 'y' shape {list(y.shape)} does not match x "
                              f"{list(x.shape)} (no broadcasting except [P,1] operands)")
    if isinstance(x, NkiTensor):
        out = ndarray(x.shape, dtype or x.dtype, sbuf, op.name)
        _isa.tensor_scalar(out, x, op, y)
        return out
    if isinstance(y, NkiTensor):
        out = ndarray(y.shape, dtype or y.dtype, sbuf, op.name)
        _isa.tensor_scalar(out, y, op, x, reverse0=True)
        return out
    return op.fn(np.float32(x), np.float32(y))


def _unary_wrapper(op, x, dtype=None):
    out = ndarray(x.shape, dtype or x.dtype, sbuf, op.name)
    _isa.activation(out, op, x)
    return out


for _name, _op in _ops.BINARY.items():
    _op.wrapper = _binary_wrapper
    globals()[_name] = _op
def _rsqrt_wrapper(op, x, dtype=None):
    # NKI >= 0.5 runs nl.rsqrt on the GpSimd engine, which cannot access PSUM.
    from .engines import onchip, emit
    onchip(x, "rsqrt", "x", ("sbuf",))
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "rsqrt")
    with np.errstate(all="ignore"):
        out.write(np.float32(1.0) / np.sqrt(x.read()))
    emit("gpsimd", "rsqrt", (("dst", out), ("data", x)))
    return out


for _name, _op in _ops.UNARY.items():
    if _name not in globals():
        _op.wrapper = _rsqrt_wrapper if _name == "rsqrt" else _unary_wrapper
        globals()[_name] = _op
# nl.copy is the tile-copy wrapper; passed as activation op= it is the identity function
_ops.NUMPY_UNARY[copy] = "copy"


class _Reduction:
    def __init__(self, name, op_name, post=None):
        self.name, self.op_name, self.post = name, op_name, post
        _ops.REDUCTION_ALIASES[name] = op_name

    def __repr__(self):
        return f"nl.{self.name}"

    def __call__(self, x, axis, dtype=None, keepdims=False):
        axes = [int(a) % x.ndim for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
        if keepdims:
            shape = tuple(1 if d in axes else s for d, s in enumerate(x.shape))
        else:
            shape = tuple(s for d, s in enumerate(x.shape) if d not in axes)
            if len(shape) < 2:
                shape = shape + (1,) * (2 - len(shape))
        out = ndarray(shape, dtype or x.dtype, sbuf, self.name)
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


sum = _Reduction("sum", "add")
max = _Reduction("max", "maximum")
min = _Reduction("min", "minimum")
prod = _Reduction("prod", "multiply")
all = _Reduction("all", "logical_and")
mean = _Reduction("mean", "add", post=_mean)
for _r in (sum, max, min, prod, all, mean):
    _ops.REDUCTION_ALIASES[_r.name] = _r.op_name


def matmul(x, y, transpose_x=False):
    """x @ y (or x.T @ y with transpose_x=True) into a new fp32 PSUM tile."""
    if not transpose_x:
        xt_ps = ndarray((x.free_size(), x.shape[0]), float32, psum, "matmul_xT")
        _isa.nc_transpose(xt_ps, x)
        xt = ndarray(xt_ps.shape, x.dtype, sbuf, "matmul_xT_sb")
        _isa.tensor_copy(xt, xt_ps)
        x = xt
    out = ndarray((x.free_size(), y.free_size()), float32, psum, "matmul")
    _isa.nc_matmul(out, x, y)
    return out


def transpose(x, dtype=None):
    """2-D transpose on the Tensor engine into a new PSUM tile."""
    out = ndarray((x.free_size(), x.shape[0]), dtype or x.dtype, psum, "transpose")
    _isa.nc_transpose(out, x)
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
    print(print_prefix, np.array(tensor.np) if isinstance(tensor, NkiTensor) else tensor, flush=True)


def affine_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


sequential_range = affine_range
static_range = affine_range


@contextlib.contextmanager
def no_reorder():
    yield


# ------------------------------------------------------------------------------------------------ more wrappers
def expand_dims(x, axis):
    """View of x with a size-1 dim inserted at ``axis``."""
    return x.expand_dim(axis)


def broadcast_to(x, shape, dtype=None):
    """Copy of x broadcast along size-1 free dims to ``shape`` (same rank). A partition-dim broadcast needs a
    TensorE matmul with a ones vector on hardware and is not done here."""
    shape = tuple(shape)
    if len(shape) != x.ndim:
        raise ValueError(f"nl.broadcast_to: shape {shape} must have the rank of x {x.shape}")
    if x.onchip and shape[0] != x.shape[0]:
        raise ConstraintError(f"rule broadcast.partition: broadcast_to operand 'x' partition dim {x.shape[0]} -> "
                              f"{shape[0]}; use nisa.nc_matmul with a ones stationary to broadcast across "
                              "partitions")
    out = ndarray(shape, dtype or x.dtype, sbuf, "broadcast_to")
    _isa.tensor_copy(out, x.broadcast_to(shape))
    return out


def logical_not(x, dtype=None):
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "logical_not")
    _isa.tensor_scalar(out, x, equal, 0.0)
    return out


def invert(x, dtype=None):
    """Bitwise NOT of an integer tile."""
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "invert")
    _isa.tensor_scalar(out, x, bitwise_xor, -1)
    return out


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


def _var(out, x, axes):
    """Population variance over axes: mean((x - mean(x))^2), all in fp32."""
    mshape = tuple(1 if d in axes else s for d, s in enumerate(x.shape))
    m = ndarray(mshape, float32, sbuf, "var_mean")
    _mean(m, x, axes)
    centered = ndarray(x.shape, float32, sbuf, "var_centered")
    _isa.tensor_tensor(centered, x, m.broadcast_to(x.shape), subtract)
    sq = ndarray(x.shape, float32, sbuf, "var_sq")
    _isa.tensor_tensor(sq, centered, centered, multiply)
    _mean(out, sq, axes)


var = _Reduction("var", "add", post=_var)


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
    _isa.tensor_tensor(y, x, r.broadcast_to(x.shape), multiply)
    out = ndarray(x.shape, dtype or x.dtype, sbuf, "rms_norm")
    _isa.tensor_tensor(out, y, w.broadcast_to(x.shape) if w.shape != x.shape else w, multiply)
    return out


def rand(shape, dtype, buffer=sbuf, name=""):
    """Uniform random values in [0, 1) from the Vector engine PRNG (32 random bits scaled by 2^-32)."""
    bits = ndarray(shape, uint32, buffer, name + "_bits" if name else "rand_bits")
    _isa.rng(bits)
    out = ndarray(shape, dtype, buffer, name or "rand")
    _isa.tensor_scalar(out, bits, multiply, 2.0 ** -32)
    return out


def fori_loop(lower, upper, body_fun, step=1):
    """Run body_fun(i) for i in range(lower, upper, step). The interpreter executes eagerly, so a device loop is a
    Python loop here."""
    for i in range(lower, upper, step):
        body_fun(i)


def while_loop(*args, **kwargs):
    raise NotImplementedError("nl.while_loop (device loop on VirtualRegisters) is not simulated by kernels.sim")
