"""Shared rule checks and trace emission used by every instruction in ``isa.py``.

Checks are O(1) Python on shapes/strides; messages follow
``rule <name>: <instruction> operand '<role>' <what> (limit <x>)``.
"""
import numpy as np

from . import dtypes as _dt
from .errors import ConstraintError
from .tensor import NkiTensor, ONCHIP
from .trace import ACCESS_BY_ROLE, READ_WRITE_DST_OPS, Instruction, Operand, _active, access_of

PMAX = 128
HBM = ("hbm", "private_hbm", "shared_hbm")


def fail(rule, instr, role, what, limit=None):
    msg = f"rule {rule}: {instr} operand '{role}' {what}"
    if limit is not None:
        msg += f" (limit {limit})"
    raise ConstraintError(msg)


def tensor(t, instr, role):
    if not isinstance(t, NkiTensor):
        fail("operand.type", instr, role, f"must be an NKI tensor, got {type(t).__name__}")
    return t


def onchip(t, instr, role, allowed=ONCHIP, align=True):
    """An SBUF/PSUM operand: buffer allowed, <=128 partitions, no partition striding, partition-start rule.
    Returns (partition_count, partition_start, free_size)."""
    if not isinstance(t, NkiTensor):
        fail("operand.type", instr, role, f"must be an NKI tensor, got {type(t).__name__}")
    st = t._st
    if st.buffer not in allowed:
        fail("buffer", instr, role, f"is in {st.buffer} ({t.name or 'unnamed'} {list(t.shape)}); must be in "
             f"{' or '.join(allowed)}")
    shape = t.shape
    if len(shape) > 5:
        fail("rank.max", instr, role, f"has {len(shape)} dims {list(shape)}; on-chip access patterns have the "
             "partition dim plus at most 4 free dims", 5)
    p = shape[0]
    if p > PMAX:
        fail("partition.max", instr, role, f"partition dimension {p} of {list(shape)} exceeds {PMAX}", PMAX)
    fs = st.free_size * st.flat.itemsize // t._flat.itemsize
    strides = t.strides
    if p > 1 and strides[0] != fs:
        fail("partition.stride", instr, role, f"strides over partitions by {strides[0]} elements; hardware does "
             f"not allow P dimension striding", fs)
    n = 1
    for k in range(1, len(shape)):
        c = shape[k]
        s = strides[k]
        if c > 65535 or not -32768 <= s <= 32767:
            fail("access_pattern.range", instr, role, f"free dims {list(shape[1:])} with strides "
                 f"{list(strides[1:])} exceed the hardware access pattern (count uint16, stride int16 elements)")
        n *= c
    start = t.offset // fs + st.base[0]
    if align:
        if p > 64:
            if start != 0:
                fail("partition.start", instr, role, f"covers {p} partitions starting at {start}; more than 64 "
                     f"partitions must start at 0", "start 0")
        elif p > 32:
            if start not in (0, 64):
                fail("partition.start", instr, role, f"covers {p} partitions starting at {start}; 33..64 partitions "
                     f"must start at 0 or 64", "start 0 or 64")
        elif start & 31:
            fail("partition.start", instr, role, f"covers {p} partitions starting at {start}; up to 32 partitions "
                 f"must start at 0, 32, 64 or 96", "start multiple of 32")
    return p, start, n


def no_psum(t, instr, role, engine):
    if t._st.buffer == "psum":
        fail("engine.psum", instr, role, f"is in PSUM; the {engine} engine cannot access PSUM")


def same_partitions(instr, role_a, pa, role_b, pb):
    if pa != pb:
        fail("partition.match", instr, role_b, f"has {pb} partitions but '{role_a}' has {pa}; the instruction "
             f"needs the same partition count on all operands", pa)


def same_free(instr, role_a, na, role_b, nb):
    if na != nb:
        fail("free.match", instr, role_b, f"has {nb} elements per partition but '{role_a}' has {na}", na)


def same_tiles(I, first, *others, allowed=ONCHIP):
    """The elementwise operand check: each (role, tensor) must pass ``onchip`` and match the first operand's
    partition count and free size. Returns the first operand's (partition_count, partition_start, free_size).
    Each operand is checked in full before the next, so with two bad operands the earlier one is reported. This runs
    on every instruction: a plain loop, and the raising checks are called only on a mismatch."""
    role, t = first
    p, start, n = onchip(t, I, role, allowed)
    for r, o in others:
        po, _, no = onchip(o, I, r, allowed)
        if po != p:
            same_partitions(I, role, p, r, po)
        if no != n:
            same_free(I, role, n, r, no)
    return p, start, n


def scalar_or_column(v, instr, role, p, fp32_tile=True):
    """tensor_scalar/activation operand: a Python number or a [P,1] tile (fp32). Returns a float32 array
    broadcastable against a [P, ...] tile, or a Python float."""
    if isinstance(v, NkiTensor):
        pv, _, nv = onchip(v, instr, role)
        if nv != 1:
            fail("operand.column", instr, role, f"is a tile {list(v.shape)}; must be a [P,1] tile or a scalar", "[P,1]")
        same_partitions(instr, "data", p, role, pv)
        if fp32_tile and v.dtype != _dt.float32:
            fail("operand.dtype", instr, role, f"is {_dt.name(v.dtype)}; [P,1] operands must be float32", "float32")
        return v._f32().reshape(pv, 1)
    if isinstance(v, (bool, int, float, np.integer, np.floating)):
        return float(v)
    fail("operand.type", instr, role, f"must be a Python number or a [P,1] tile, got {type(v).__name__}")


def span_of(t):
    """(partition_start, partition_count, byte_lo, byte_hi) of view ``t`` relative to its storage's space origin
    (``Storage.base``); see kernels.sim.trace. A few integer ops: this runs for every operand of every
    instruction while a trace records."""
    st = t._st
    isz = t._flat.itemsize
    off = t.offset
    shape = t.shape
    strides = t.strides
    b0, b1 = st.base
    onchip = st.buffer in ONCHIP
    if onchip:                                               # byte range within a partition: free dims only
        fs = st.free_size * st.flat.itemsize // isz          # elements per partition in the view's units
        p0 = off // fs
        lo = hi = off - p0 * fs
    else:
        lo = hi = off
    for k in range(1 if onchip else 0, len(shape)):
        c = shape[k]
        if c > 1:
            d = (c - 1) * strides[k]
            if d > 0:
                hi += d
            else:
                lo += d
    if onchip:
        return (p0 + b0, shape[0], lo * isz + b1, (hi + 1) * isz + b1)
    return (0, 1, lo * isz + b1, (hi + 1) * isz + b1)


def rec(role, t, op=None):
    return Operand(role, t.shape, _dt.name(t.dtype), t._st.buffer, t.nbytes, t._st.space, span_of(t),
                   access_of(op, role))


_new_tuple = tuple.__new__


_NAME_OF = _dt._NAMES
_HBM_SET = frozenset(HBM)


def emit(engine, op, operands, name=None, alu=None):
    """Record an instruction; operands = [(role, tensor), ...] (None tensors skipped). Each Operand gets its
    space, byte span (``span_of``) and access
    ("r"/"w"/"rw", kernels.sim.trace.access_of). HBM bytes: writes for the written roles, reads for the others.
    ``alu``: the instruction's ALU op names (Instruction.alu)."""
    if not _active:
        return
    r = w = 0
    recs = []
    rw_dst = op in READ_WRITE_DST_OPS
    for role, t in operands:
        if t is None:
            continue
        st = t._st
        acc = ACCESS_BY_ROLE.get(role, "r")
        if rw_dst and role == "dst":
            acc = "rw"
        buf = st.buffer
        dt = t.dtype
        shape = t.shape
        nb = dt.itemsize
        for c in shape:
            nb *= c
        span = span_of(t)
        dn = _NAME_OF.get(id(dt))
        if dn is None:
            dn = _dt.name(dt)
        recs.append(_new_tuple(Operand, (role, shape, dn, buf, nb, st.space, span, acc)))
        if buf in _HBM_SET:
            if acc == "r":
                r += nb
            else:
                w += nb
    ins = Instruction(engine, op, recs, r, w, name, alu)
    for tr in _active:
        tr.instructions.append(ins)


def as_shape(values, shape):
    """Reshape computed values to a dst shape (element order row-major over each view)."""
    if values.shape == shape:
        return values
    return values.reshape(shape)


def store(dst, values):
    """Write fp32 (or integer) results into dst with the engine cast; clears PSUM matmul flags."""
    _dt.cast_into(dst._v, as_shape(values, dst.shape), dst.dtype)
    clear_mm_flags(dst)


def clear_mm_flags(t):
    """After a write of PSUM view ``t`` by an instruction other than a matmul: its elements are no longer 'written
    by matmul' (a later accumulate=None matmul overwrites them; accumulate=True refuses them). No-op outside PSUM.
    Views of 2-byte dtypes have no flags of their own (mm_flags gives them a throwaway array): nothing to clear."""
    st = t._st
    if st.mm_written is not None and t._flat.itemsize == 4:
        mm_flags(t)[...] = False


def mm_flags(t):
    """Per-element 'written by matmul' flags of a PSUM view (same shape as the view)."""
    f = t._st.mm_written
    ratio = t._flat.itemsize
    return np.ndarray(t.shape, np.bool_, buffer=f, offset=t.offset * ratio // 4,
                      strides=tuple(s * ratio // 4 for s in t.strides)) if ratio == 4 else \
        np.zeros(t.shape, bool)
