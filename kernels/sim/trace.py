"""Instruction trace: the record of every executed instruction (input of the cost model).

Use::

    from kernels.sim import trace
    with trace.record() as tr:
        kernel(x)
    tr.instructions          # list of Instruction
    tr.counts_by_engine()    # {"vector": 12, "dma": 4, ...}
    tr.hbm_bytes()           # (bytes read from HBM, bytes written to HBM)
    trace.last()             # the Trace of the most recent kernel launch (nki.jit / nki.simulate call)
    trace.last().peak_bytes  # {"sbuf": ..., "psum": ...} peak live on-chip bytes per partition of that launch

Each :class:`Instruction` has ``engine`` ("tensor"|"vector"|"scalar"|"gpsimd"|"dma"|"sync"), ``op`` (the nisa
name, e.g. "nc_matmul"), ``operands`` (list of :class:`Operand` ``(role, shape, dtype, buffer, nbytes)``; dtype is
the NKI dtype name, buffer one of "sbuf"|"psum"|"hbm"|"private_hbm"|"shared_hbm"|"const", nbytes = bytes
the operand view covers), ``bytes_hbm_read``, ``bytes_hbm_written`` and ``name`` (the ``name=`` argument).
Records hold shapes only, never tensors, so tracing keeps no memory alive.
"""
import contextlib
from collections import Counter
from typing import NamedTuple


class Operand(NamedTuple):
    role: str
    shape: tuple
    dtype: str
    buffer: str
    nbytes: int


class Instruction:
    __slots__ = ("engine", "op", "operands", "bytes_hbm_read", "bytes_hbm_written", "name")

    def __init__(self, engine, op, operands, bytes_hbm_read=0, bytes_hbm_written=0, name=None):
        self.engine = engine
        self.op = op
        self.operands = operands
        self.bytes_hbm_read = bytes_hbm_read
        self.bytes_hbm_written = bytes_hbm_written
        self.name = name

    def operand(self, role):
        for o in self.operands:
            if o.role == role:
                return o
        raise KeyError(role)

    def __repr__(self):
        ops = ", ".join(f"{o.role}={o.buffer}{list(o.shape)}:{o.dtype}" for o in self.operands)
        return f"<{self.engine}.{self.op} {ops}>"


class Trace:
    """An ordered list of executed instructions."""

    def __init__(self):
        self.instructions = []
        self.peak_bytes = None   # launch traces: {"sbuf": peak B/partition, "psum": peak B/partition}

    def __len__(self):
        return len(self.instructions)

    def __iter__(self):
        return iter(self.instructions)

    def counts_by_engine(self):
        return dict(Counter(i.engine for i in self.instructions))

    def counts_by_op(self):
        return dict(Counter(i.op for i in self.instructions))

    def hbm_bytes(self):
        """(bytes read from HBM, bytes written to HBM) over the whole trace."""
        r = w = 0
        for i in self.instructions:
            r += i.bytes_hbm_read
            w += i.bytes_hbm_written
        return r, w


_active = []      # traces currently recording (a launch trace plus any user record() blocks)
_last = None


def emit(instr):
    for t in _active:
        t.instructions.append(instr)


@contextlib.contextmanager
def record():
    """Record every instruction executed inside the block (kernel launches included)."""
    t = Trace()
    _active.append(t)
    try:
        yield t
    finally:
        _active.remove(t)


def last():
    """Trace of the most recent kernel launch, or None before the first launch."""
    return _last


def _begin_launch():
    t = Trace()
    _active.append(t)
    return t


def _end_launch(t):
    global _last
    if t in _active:
        _active.remove(t)
    _last = t
