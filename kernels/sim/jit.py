"""``nki.jit`` / ``nki.simulate`` for the interpreter: run a kernel eagerly on numpy arrays or CPU torch tensors.

Arguments that are numpy arrays or torch tensors become HBM tensors (sharing memory where possible, so in-place
HBM writes reach the caller's array as in the official simulator); the kernel's returned ``shared_hbm`` tensors
come back as the same kind as the first array argument (numpy or torch; bf16 via a 16-bit view). Each launch
resets the interpreter state (capacity accounting, reduce registers, PRNG seed 0, platform from
``NEURON_PLATFORM_TARGET_OVERRIDE``) and leaves its instruction trace in ``trace.last()``.
``kernel[lnc](...)`` takes the logical-NeuronCore degree as in NKI >= 0.3: 1 on trn1 (anything else, and any
multi-dimensional grid, raises ConstraintError "rule lnc"); 2 on trn2+ runs the two instances one after another
with ``nl.program_id(0)`` = 0, 1, where ``shared_hbm`` tensors allocated by instance 1 alias those allocated in the
same order by instance 0.
"""
import functools
import itertools

import numpy as np

from . import dtypes as _dt
from . import isa as _isa
from . import language as _nl
from . import memory, target, trace
from . import tensor as _tensor
from .errors import ConstraintError
from .errors import ConstraintError as _ConstraintError
from .tensor import NkiTensor


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def _to_hbm(x, name):
    if _is_torch(x):
        import torch
        if x.device.type != "cpu":
            raise TypeError(f"kernel argument {name}: the interpreter takes CPU tensors, got device {x.device}")
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(_dt.bfloat16)
        elif t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
            arr = t.view(torch.uint8).numpy().view(_dt.from_torch(t.dtype))
        else:
            arr = t.numpy()
        return _tensor.from_numpy(arr, "hbm", name)
    if isinstance(x, np.ndarray):
        return _tensor.from_numpy(x, "hbm", name)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_hbm(v, f"{name}[{i}]") for i, v in enumerate(x))
    return x


def _from_hbm(t, kind):
    if isinstance(t, (list, tuple)):
        return type(t)(_from_hbm(v, kind) for v in t)
    if isinstance(t, dict):
        return {k: _from_hbm(v, kind) for k, v in t.items()}
    if not isinstance(t, NkiTensor):
        return t
    if t._st.buffer not in ("hbm", "private_hbm", "shared_hbm"):
        raise _ConstraintError(f"rule output.buffer: kernel output {t.name!r} {list(t.shape)} is in {t._st.buffer}; "
                               "a kernel returns HBM tensors (nl.shared_hbm/nl.hbm allocations, or an input it "
                               "updated in place)")
    arr = np.array(t._v)
    if kind == "torch":
        import torch
        if arr.dtype == _dt.bfloat16:
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        if arr.dtype in (_dt.float8_e4m3fn, _dt.float8_e5m2):
            return torch.from_numpy(arr.view(np.uint8).copy()).view(
                torch.float8_e4m3fn if arr.dtype == _dt.float8_e4m3fn else torch.float8_e5m2)
        return torch.from_numpy(arr)
    return arr


class _SharedAlias:
    """During grid launches, instance k > 0 re-uses instance 0's shared_hbm allocations in order."""

    def __init__(self):
        self.first = []
        self.index = None


_alias = None
_orig_allocate = _tensor.allocate


def _allocate_hook(shape, dtype, buffer, name="", fill=None):
    a = _alias
    if a is not None and _tensor._buffer_name(buffer) == "shared_hbm":
        if a.index is None:
            t = _orig_allocate(shape, dtype, buffer, name, fill)
            a.first.append(t)
            return t
        if a.index < len(a.first):
            t = a.first[a.index]
            a.index += 1
            if tuple(t.shape) != tuple(int(s) for s in shape) or t.dtype != _dt.normalize(dtype):
                raise ValueError(f"grid instance allocates shared_hbm {name!r} {shape} differently from instance 0")
            return t
    return _orig_allocate(shape, dtype, buffer, name, fill)


class Kernel:
    """A kernel function callable on numpy/torch arrays (runs on the interpreter) or inlined inside a kernel."""

    def __init__(self, fn, grid=(), **options):
        for bad in ("platform_target", "mode"):
            if bad in options:
                raise ValueError(f"nki.jit({bad}=...) was removed in NKI 0.3; set NEURON_PLATFORM_TARGET_OVERRIDE "
                                 f"instead")
        self.fn = fn
        self.grid = grid
        self.options = options
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        if not isinstance(grid, tuple):
            grid = (grid,)
        return Kernel(self.fn, tuple(int(g) for g in grid), **self.options)

    def __call__(self, *args, **kwargs):
        if _in_kernel[0]:
            return self.fn(*args, **kwargs)      # helper kernels are inlined
        return _launch(self.fn, self.grid, args, kwargs)


_in_kernel = [False]


def _launch(fn, grid, args, kwargs):
    global _alias
    kind = "numpy"
    for a in itertools.chain(args, kwargs.values()):
        if _is_torch(a):
            kind = "torch"
            break
        if isinstance(a, np.ndarray):
            break
    target.refresh()
    if grid:
        if len(grid) != 1:
            raise ConstraintError(f"rule lnc: kernel{list(grid)}(...) launches a multi-dimensional SPMD grid; in NKI "
                                  ">= 0.3 the bracket is the logical-NeuronCore degree (one int): loop over batch/heads "
                                  "inside the kernel")
        lnc = grid[0]
        limit = 1 if target.version() == 2 else 2
        if not 1 <= lnc <= limit:
            raise ConstraintError(f"rule lnc: kernel[{lnc}](...) asks for LNC degree {lnc}; NeuronCore-v"
                                  f"{target.version()} supports {'only 1' if limit == 1 else '1 or 2'} (limit {limit})")
        if lnc == 1:
            grid = ()
    hargs = [_to_hbm(a, f"arg{i}") for i, a in enumerate(args)]
    hkw = {k: _to_hbm(v, k) for k, v in kwargs.items()}
    memory.begin_launch()
    _isa._reset_state()
    tr = trace._begin_launch()
    _in_kernel[0] = True
    try:
        if not grid:
            out = fn(*hargs, **hkw)
        else:
            _alias = _SharedAlias()
            out = None
            _nl._grid.dims = grid
            for k, ids in enumerate(itertools.product(*(range(g) for g in grid))):
                _nl._grid.ids = ids
                _alias.index = None if k == 0 else 0
                r = fn(*hargs, **hkw)
                if k == 0:
                    out = r
    finally:
        _in_kernel[0] = False
        _alias = None
        _nl._grid.dims = ()
        _nl._grid.ids = ()
        tr.peak_bytes = memory.peak_bytes()
        memory.end_launch()
        trace._end_launch(tr)
    return _from_hbm(out, kind)


_tensor.allocate = _allocate_hook
_nl._allocate = _allocate_hook


def jit(fn=None, **kwargs):
    """Decorator: ``@nki.jit`` or ``@nki.jit(**options)``. Options are accepted and ignored (except the removed
    ``platform_target``/``mode``, which raise as in NKI >= 0.3)."""
    if fn is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(fn, **kwargs)


def simulate(kernel):
    """``nki.simulate(kernel)(*args)``: run a kernel (jit-decorated or plain function) on the interpreter."""
    if isinstance(kernel, Kernel):
        return lambda *a, **k: _launch(kernel.fn, kernel.grid, a, k)
    return lambda *a, **k: _launch(kernel, (), a, k)
