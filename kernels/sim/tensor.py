"""NkiTensor: storage plus a strided view (new NKI API semantics).

Element ``(i0, i1, ...)`` of a view lives at ``offset + sum(strides[k] * i_k)`` elements into its storage.
SBUF/PSUM storages are laid out as ``[partitions, free]`` (partition stride = free size of the storage); dim 0 of
an on-chip view is the partition dim. Views share storage: writes through one are seen through all.

Indexing (``t[...]``) follows NKI's rank rules: on-chip views stay >= 2-D (an integer on the partition dim keeps
it with size 1; an integer on a free dim drops it unless fewer than 2 dims would remain, then the last indexed
free dim is kept with size 1); HBM views drop integer-indexed dims like numpy. Slices must lie inside the dim
(no silent clamping), negative steps are refused.
"""
import itertools
import sys

import numpy as np

from . import dtypes as _dt
from . import memory
from .errors import ConstraintError, LanguageError
from .objects import NKIObject, REGION_OF

ONCHIP = ("sbuf", "psum")
HBM_BUFFERS = ("hbm", "private_hbm", "shared_hbm")
_SIM_DIR = __file__.rsplit("/", 1)[0]


class DynSlice:
    """``nl.ds(start, size)``: the slice ``start:start+size``."""
    __slots__ = ("start", "size", "step")

    def __init__(self, start, size, step=1):
        self.start, self.size, self.step = int(start), int(size), int(step)

    def as_slice(self):
        return slice(self.start, self.start + self.size * self.step, self.step)


_storage_ids = itertools.count()


class Storage:
    """Backing memory of tensors: a flat numpy array plus placement facts.

    ``space`` and ``base`` place the storage for the trace's byte ranges (the cost model's dependencies):
    ``space`` is the hashable identity of the address space it lives in (default: a unique id, i.e. a storage
    overlaps only itself); ``base`` = (partition offset, byte offset) of the storage's origin in that space
    (default (0, 0)). Storages placed at explicit addresses share one space, e.g. ``("addr", "sbuf")`` with
    ``base=address``, so overlapping placements are seen as the same memory."""
    __slots__ = ("flat", "buffer", "name", "free_size", "mm_written", "space", "base", "__weakref__")

    def __init__(self, flat, buffer, name, free_size, space=None, base=(0, 0)):
        self.flat = flat
        self.buffer = buffer
        self.name = name
        self.free_size = free_size        # elements per partition (on-chip), total size (HBM)
        self.mm_written = None            # PSUM: per-element "last written by a matmul" flags
        self.space = next(_storage_ids) if space is None else space
        self.base = base


def _caller_location():
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_SIM_DIR):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def _kernel_line():
    """file:line of the first frame outside kernels.sim, numpy and torch (the kernel's own source line)."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith(_SIM_DIR) or "/numpy/" in fn or "/torch/" in fn or fn.startswith("<__array_function")):
            break
        f = f.f_back
    if f is None:
        return "?"
    import linecache
    src = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
    return f"{f.f_code.co_filename}:{f.f_lineno}" + (f" ({src})" if src else "")


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def allocate(shape, dtype, buffer, name="", fill=None):
    """New tensor. ``fill=None`` fills like the official simulator's uninitialised memory: NaN for floats, 4 for ints."""
    dtype = _dt.normalize(dtype)
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape) or not shape:
        raise ValueError(f"allocation {name or ''}: shape {shape} must be non-empty with positive sizes")
    buffer = _buffer_name(buffer)
    if buffer in ONCHIP and shape[0] > 128:
        raise ConstraintError(f"rule partition.max: ndarray operand '{name or 'tile'}' partition dimension "
                              f"{shape[0]} of {shape} exceeds 128 (limit 128)")
    n = _prod(shape)
    sdt = np.dtype(np.float32) if _dt.is_tf32(dtype) else dtype
    if fill is None:
        fill = np.nan if dtype.kind == "f" or _dt.is_float(dtype) else 4
    flat = _dt.full(n, fill, sdt) if fill != 0 else np.zeros(n, dtype=sdt)
    free = n // shape[0] if buffer in ONCHIP else n
    st = Storage(flat, buffer, name, free)
    if buffer in ONCHIP:
        memory.track(st, buffer, free * dtype.itemsize, name, shape, _dt.name(dtype), _caller_location())
        if buffer == "psum":
            st.mm_written = np.zeros(n, dtype=bool)
    strides = _contiguous_strides(shape)
    return NkiTensor(st, flat, shape, strides, 0, dtype)


def allocate_at(shape, dtype, buffer, name, address):
    """An SBUF/PSUM tile at ``address = (partition, byte_offset)`` of its buffer's shared placement space (see
    kernels.sim.memory.backing): overlapping placements see each other's bytes. The storage covers the whole
    space from the tile's origin on; ``Storage.space = ("addr", buffer)`` and ``Storage.base = address`` place it
    for the trace."""
    dtype = _dt.normalize(dtype)
    shape = tuple(int(s) for s in shape)
    buffer = _buffer_name(buffer)
    if buffer not in ONCHIP:
        raise ConstraintError(f"rule address.buffer: ndarray operand '{name or 'tile'}' address= places SBUF/PSUM "
                              f"tiles only, not {buffer}")
    if not shape or shape[0] > 128 or any(s <= 0 for s in shape):
        raise ConstraintError(f"rule partition.max: ndarray operand '{name or 'tile'}' shape {shape} must have at "
                              "most 128 partitions and positive sizes (limit 128)")
    try:
        p0, off = (int(a) for a in address)
    except (TypeError, ValueError):
        raise ConstraintError(f"rule address.form: ndarray operand '{name or 'tile'}' address {address!r} must be "
                              "(partition, byte_offset)") from None
    isz = dtype.itemsize
    limit = memory.LIMITS[buffer]
    free_bytes = _prod(shape[1:]) * isz
    if off % isz:
        raise ConstraintError(f"rule address.align: ndarray operand '{name or 'tile'}' byte offset {off} is not a "
                              f"multiple of the {_dt.name(dtype)} size {isz} (limit {isz}-byte alignment)")
    if p0 < 0 or p0 + shape[0] > 128:
        raise ConstraintError(f"rule address.range: ndarray operand '{name or 'tile'}' partitions {p0}.."
                              f"{p0 + shape[0] - 1} exceed 128 (limit 128)")
    raw, flags = memory.backing(buffer)
    start = p0 * limit + off
    sdt = np.dtype(np.float32) if _dt.is_tf32(dtype) else dtype
    n_bytes = (len(raw) - start) // isz * isz
    flat = raw[start:start + n_bytes].view(sdt)
    st = Storage(flat, buffer, name, limit // isz, space=("addr", buffer), base=(p0, off))
    memory.track_at(st, buffer, off, off + free_bytes, name, shape, _dt.name(dtype), _caller_location())
    if buffer == "psum":
        st.mm_written = flags[start // 4:start // 4 + n_bytes // 4]
    strides = (limit // isz,) + _contiguous_strides(shape[1:])
    return NkiTensor(st, flat, shape, strides, 0, dtype)


def _contiguous_strides(shape):
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return tuple(strides)


def _buffer_name(buffer):
    if buffer is None:
        return "sbuf"
    b = getattr(buffer, "value", buffer)
    b = str(b)
    if b not in ONCHIP + HBM_BUFFERS:
        raise ValueError(f"unknown buffer {buffer!r}; expected one of {ONCHIP + HBM_BUFFERS}")
    return b


def from_numpy(arr, buffer="hbm", name=""):
    """Wrap a numpy array (shares memory when it is contiguous and of an NKI dtype)."""
    arr = np.asarray(arr)
    dtype = _dt.normalize(arr.dtype, where=f"kernel argument {name}")
    if arr.dtype != dtype:               # a non-native byte order: the values in native order
        arr = arr.astype(dtype)
    flat = np.ascontiguousarray(arr).reshape(-1)
    st = Storage(flat, buffer, name, flat.size)
    return NkiTensor(st, flat, tuple(arr.shape), _contiguous_strides(arr.shape), 0, dtype)


class NkiTensor(NKIObject):
    """A view of a storage: ``shape``, ``strides`` and ``offset`` in elements, ``dtype``, ``buffer`` (an
    nl.MemoryRegion), ``name``. ``_ind`` marks an indirect view (dynamic select / ``.ap(vector_offset=)``):
    ("vector", index tile, dim) or ("scalar", value, dim)."""
    __slots__ = ("_st", "_flat", "shape", "strides", "offset", "dtype", "_np", "_ind")

    def __init__(self, st, flat, shape, strides, offset, dtype, ind=None):
        self._st = st
        self._flat = flat          # flat array of the storage's bytes seen as this view's dtype
        self.shape = shape
        self.strides = strides
        self.offset = offset
        self.dtype = dtype
        self._np = None
        self._ind = ind

    # ---- basic facts -------------------------------------------------------------------------------------------
    @property
    def buffer(self):
        return REGION_OF[self._st.buffer]

    @property
    def name(self):
        return self._st.name

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return _prod(self.shape)

    @property
    def itemsize(self):
        return self.dtype.itemsize

    @property
    def nbytes(self):
        return _prod(self.shape) * self.dtype.itemsize

    @property
    def _onchip(self):
        return self._st.buffer in ONCHIP

    def _free(self):
        """Elements per partition of this view (product of the free dims)."""
        return _prod(self.shape[1:])

    def _pstart(self):
        """First partition of an on-chip view."""
        st = self._st
        fs = st.free_size * st.flat.itemsize // self._flat.itemsize
        return self.offset // fs + st.base[0] if st.buffer in ONCHIP else 0

    # ---- the NKI language's Python subset (NKI language guide): tensor values never reach Python -------------
    def _refuse(self, what):
        raise LanguageError(f"rule language.tensor_value: {what} of tensor {self.name or '<unnamed>'} "
                            f"{list(self.shape)} in {self._st.buffer} at {_kernel_line()}: a kernel cannot read "
                            "tensor values into Python (the NKI compiler traces the kernel; values exist only on "
                            "the device). Use nisa/nl instructions, nl.device_print to inspect, or "
                            "nisa.register_load for a loop bound")

    def __array__(self, dtype=None, copy=None):
        self._refuse("numpy conversion (np.asarray/np.array/a numpy function)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        self._refuse(f"numpy ufunc np.{ufunc.__name__}")

    def __array_function__(self, func, types, args, kwargs):
        self._refuse(f"numpy function np.{getattr(func, '__name__', func)}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        t = next((a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, NkiTensor)), None)
        if t is None:
            raise LanguageError(f"rule language.tensor_value: torch function {func} called on NKI tensors")
        t._refuse(f"torch function {getattr(func, '__name__', func)}")

    def __bool__(self):
        self._refuse("Python truth test (if/while/and/or on a tensor: data-dependent control flow)")

    def __float__(self):
        self._refuse("float()")

    def __int__(self):
        self._refuse("int()")

    def __index__(self):
        self._refuse("use as a Python index/int (data-dependent indexing needs .select(dim, tensor) or "
                     ".ap(scalar_offset=))")

    def __complex__(self):
        self._refuse("complex()")

    def __repr__(self):
        return (f"NkiTensor(name={self.name!r}, shape={self.shape}, dtype={_dt.name(self.dtype)}, "
                f"buffer={self.buffer}, offset={self.offset}, strides={self.strides})")

    def __len__(self):
        return self.shape[0]

    # ---- numpy access ------------------------------------------------------------------------------------------
    @property
    def _v(self):
        """Writable numpy view of the elements (storage dtype; tfloat32 is float32)."""
        a = self._np
        if a is None:
            flat = self._flat
            isz = flat.itemsize
            a = np.ndarray(self.shape, flat.dtype, flat, self.offset * isz, tuple([s * isz for s in self.strides]))
            self._np = a
        return a

    def _f32(self):
        """Values as float32 (a copy only when a cast is needed)."""
        a = self._v
        if a.dtype != np.float32:
            return _dt.to_f32(a)
        return a

    def _write(self, values):
        """Store values with the engines' cast (RNE, int saturation) into this view."""
        self._v[...] = _dt.cast(values, self.dtype)

    # ---- views -------------------------------------------------------------------------------------------------
    def _view(self, shape, strides, offset, dtype=None, flat=None):
        if self._ind is not None and self._ind[0] == "vector":
            raise ConstraintError(f"rule indirect.view: {self.name!r} is a vector-indirect view; it cannot be "
                                  "sliced or reshaped further (pass it to the DMA as is)")
        return NkiTensor(self._st, self._flat if flat is None else flat, tuple(shape), tuple(strides), offset,
                         self.dtype if dtype is None else dtype)

    def __getitem__(self, key):
        """Fast path for the common keys (plain ints and slices with int/None bounds, in range); anything else, or
        anything out of range, goes through :meth:`_getitem` (the general rules and their errors)."""
        if type(key) is not tuple:
            key = (key,)
        shape = self.shape
        strides = self.strides
        if len(key) > len(shape):
            return self._getitem(key)
        onchip = self._st.buffer in ONCHIP
        offset = self.offset
        nshape, nstrides = [], []
        last_int = None
        d = 0
        for k in key:
            n = shape[d]
            st = strides[d]
            tk = type(k)
            if tk is slice:
                start, stop, step = k.start, k.stop, k.step
                if start is None:
                    start = 0
                elif type(start) is not int or start < 0:
                    return self._getitem(key)
                if stop is None:
                    stop = n
                elif type(stop) is not int or stop < 0:
                    return self._getitem(key)
                if not (start < n and start < stop <= n):
                    return self._getitem(key)
                if step is None or step == 1 and type(step) is int:
                    nshape.append(stop - start)
                    nstrides.append(st)
                elif type(step) is int and step > 0:
                    nshape.append((stop - start + step - 1) // step)
                    nstrides.append(st * step)
                else:
                    return self._getitem(key)
                offset += start * st
            elif tk is int:
                if not 0 <= k < n:
                    return self._getitem(key)
                offset += k * st
                if onchip and d == 0:
                    nshape.append(1)
                    nstrides.append(st)
                else:
                    last_int = st
            else:
                return self._getitem(key)
            d += 1
        if d < len(shape):
            nshape.extend(shape[d:])
            nstrides.extend(strides[d:])
        if onchip and len(nshape) < 2 and last_int is not None:
            nshape.append(1)
            nstrides.append(last_int)
        if not nshape:
            nshape, nstrides = [1], [1]
        return self._view(nshape, nstrides, offset)

    def _getitem(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        # expand Ellipsis
        n_ell = sum(1 for k in key if k is Ellipsis)
        if n_ell > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if n_ell:
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = len(self.shape) - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > len(self.shape):
            raise IndexError(f"too many indices ({len(key)}) for tensor {self.name!r} of shape {self.shape}")
        key = key + (slice(None),) * (len(self.shape) - len(key))
        onchip = self._st.buffer in ONCHIP
        offset = self.offset
        shape, strides = [], []
        last_int_dim = None
        for d, (k, n, s) in enumerate(zip(key, self.shape, self.strides)):
            if isinstance(k, DynSlice):
                k = k.as_slice()
            if isinstance(k, slice):
                start, stop, step = k.start, k.stop, k.step
                step = 1 if step is None else int(step)
                if step <= 0:
                    raise IndexError(f"slice step must be positive (dim {d} of {self.name!r} {self.shape})")
                start = 0 if start is None else int(start)
                stop = n if stop is None else int(stop)
                if start < 0:
                    start += n
                if stop < 0:
                    stop += n
                if not (0 <= start < n) or not (start < stop <= n):
                    raise IndexError(f"slice {start}:{stop} out of bounds for dim {d} (size {n}) of tensor "
                                     f"{self.name!r} {self.shape}")
                cnt = (stop - start + step - 1) // step
                offset += start * s
                shape.append(cnt)
                strides.append(s * step)
            else:
                try:
                    i = int(k)
                except TypeError:
                    raise IndexError(f"unsupported index {k!r} on tensor {self.name!r} (integers, slices, ..., "
                                     f"nl.ds only)") from None
                if i < 0:
                    i += n
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of bounds for dim {d} (size {n}) of tensor {self.name!r} "
                                     f"{self.shape}")
                offset += i * s
                if onchip and d == 0:
                    shape.append(1)
                    strides.append(s)
                else:
                    last_int_dim = (len(shape), s)
        if onchip and len(shape) < 2 and last_int_dim is not None:
            shape.append(1)
            strides.append(last_int_dim[1])
        if not shape:
            shape, strides = [1], [1]
        return self._view(shape, strides, offset)

    def __setitem__(self, key, value):
        raise TypeError("NKI tensors are written by instructions (nisa.* dst=, nl.store, nisa.dma_copy), "
                        "not by item assignment")

    def reshape(self, shape):
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(s) for s in shape)
        v = self._v.view()
        try:
            v.shape = shape
        except (AttributeError, ValueError):
            if _prod(shape) != self.size and -1 not in shape:
                why = f"element counts differ ({self.size} vs {_prod(shape)})"
            else:
                why = "reshape needs a view whose reshaped dims are contiguous (NKI reshape never copies)"
            raise ValueError(f"cannot reshape tensor {self.name!r} {self.shape} (strides {self.strides}) to "
                             f"{shape}: {why}") from None
        if self._onchip and (len(v.shape) < 2 or v.shape[0] != self.shape[0]):
            raise ValueError(f"reshape of on-chip tensor {self.name!r} {self.shape} to {tuple(v.shape)} must keep "
                             f"the partition dim {self.shape[0]} and stay >= 2-D")
        isz = self._flat.itemsize
        return self._view(v.shape, [s // isz for s in v.strides], self.offset)

    def view(self, dtype):
        """Bit reinterpretation; the last dim is rescaled by the itemsize ratio."""
        dtype = _dt.normalize(dtype)
        old, new = self.dtype.itemsize, dtype.itemsize
        if old == new:
            sdt = np.dtype(np.float32) if _dt.is_tf32(dtype) else dtype
            return self._view(self.shape, self.strides, self.offset, dtype, self._flat.view(sdt))
        if self.strides[-1] != 1:
            raise ValueError(f"view({_dt.name(dtype)}) needs a unit-stride last dim (tensor {self.name!r})")
        if (self.shape[-1] * old) % new or any((s * old) % new for s in self.strides[:-1]) or \
                (self.offset * old) % new:
            raise ValueError(f"view({_dt.name(dtype)}) of {self.name!r} {self.shape}: sizes/offset not divisible")
        sdt = np.dtype(np.float32) if _dt.is_tf32(dtype) else dtype
        flat = self._st.flat.view(np.uint8).view(sdt)
        shape = self.shape[:-1] + (self.shape[-1] * old // new,)
        strides = tuple(s * old // new for s in self.strides[:-1]) + (1,)
        return self._view(shape, strides, self.offset * old // new, dtype, flat)

    def slice(self, dim, start, end, step=1):
        key = [slice(None)] * self.ndim
        key[dim] = slice(start, end, step)
        return self[tuple(key)]

    def select(self, dim, index):
        """Drop ``dim`` at ``index``: an int (static) or a VirtualRegister / [1,1] tile (dynamic; resolved here
        because execution is eager, the view is then marked indirect)."""
        d = dim % self.ndim
        dynamic = not isinstance(index, int)
        if dynamic:
            if self._ind is not None:
                raise ConstraintError("rule indirect.chain: select on an already indirect view (one dynamic "
                                      "select per tensor)")
            if self._onchip and d == 0:
                raise ConstraintError("rule indirect.partition: a dynamic select cannot pick the partition dim of "
                                      "an on-chip tensor")
            index = _dynamic_value(index, "select")
        elif self._onchip and d == 0:
            raise ValueError("select on the partition dim of an on-chip tensor; use slice(0, i, i+1)")
        shape = self.shape[:d] + self.shape[d + 1:]
        strides = self.strides[:d] + self.strides[d + 1:]
        if not 0 <= index < self.shape[d]:
            raise IndexError(f"select index {index} out of bounds for dim {d} of {self.shape}")
        return NkiTensor(self._st, self._flat, shape or (1,), strides or (1,), self.offset + index * self.strides[d],
                         self.dtype, ("scalar", index, d) if dynamic else self._ind)

    def vector_select(self, dim, vector_offset):
        """Per-partition indirect rows of an HBM tensor: row ``vector_offset[p]`` of dim 0 for output partition p
        (dim must be 0; resolved by the DMA that reads or writes the view)."""
        if dim != 0:
            raise ConstraintError(f"rule indirect.dim: vector_select dim must be 0, got {dim}")
        return self.ap([[self.strides[0], vector_offset.shape[0]]] +
                       [[s, n] for s, n in zip(self.strides[1:], self.shape[1:])], vector_offset=vector_offset,
                       indirect_dim=0)

    def is_indirect(self):
        return self._ind is not None

    def indirect(self, index, num_elem=None):
        """Tensor Indirection (NeuronCore-v4+)."""
        from . import target
        target.require(4, "NkiTensor.indirect", "Tensor Indirection")
        raise NotImplementedError("NkiTensor.indirect (NeuronCore-v4 Tensor Indirection) is not simulated")

    def rearrange(self, src_pattern, dst_pattern, fixed_sizes=None):
        """einops-style view: split the grouped dims of ``src_pattern``, reorder to ``dst_pattern``'s order and merge
        its groups (no copy; merging needs contiguous dims)."""
        fixed = dict(fixed_sizes or {})
        if len(src_pattern) != self.ndim:
            raise ValueError(f"rearrange: src pattern {src_pattern} has {len(src_pattern)} dims, tensor has "
                             f"{self.ndim}")
        t, names = self, []
        for d in range(self.ndim - 1, -1, -1):       # split from the last dim so earlier dim numbers stay valid
            entry = src_pattern[d]
            if isinstance(entry, str):
                names.insert(0, entry)
                continue
            sizes = [fixed.get(n, -1) for n in entry]
            if sizes.count(-1) > 1:
                raise ValueError(f"rearrange: group {entry} needs fixed_sizes for all but one name")
            known = _prod(x for x in sizes if x != -1)
            sizes = [self.shape[d] // known if x == -1 else x for x in sizes]
            t = t.reshape_dim(d, tuple(sizes))
            names[0:0] = list(entry)
        flat_dst = [n for e in dst_pattern for n in ((e,) if isinstance(e, str) else e)]
        if sorted(flat_dst) != sorted(names):
            raise ValueError(f"rearrange: dst pattern names {flat_dst} differ from src names {names}")
        t = t.permute(tuple(names.index(n) for n in flat_dst))
        d = 0
        for e in dst_pattern:
            if isinstance(e, str):
                d += 1
                continue
            if len(e) > 1:
                t = t.flatten_dims(d, d + len(e) - 1)
            d += 1
        return t

    def permute(self, dims):
        dims = [d % self.ndim for d in dims]
        if sorted(dims) != list(range(self.ndim)):
            raise ValueError(f"permute dims {dims} is not a permutation of {self.ndim} dims")
        return self._view([self.shape[d] for d in dims], [self.strides[d] for d in dims], self.offset)

    def broadcast(self, dim, size):
        d = dim % self.ndim
        if self.shape[d] != 1:
            raise ValueError(f"broadcast of dim {d} needs size 1, got {self.shape[d]}")
        shape = list(self.shape)
        strides = list(self.strides)
        shape[d], strides[d] = int(size), 0
        return self._view(shape, strides, self.offset)

    def _broadcast_to(self, shape):
        t = self
        for d, (a, b) in enumerate(zip(self.shape, shape)):
            if a != b:
                t = t.broadcast(d, b)
        return t

    def expand_dim(self, dim):
        d = dim % (self.ndim + 1)
        return self._view(self.shape[:d] + (1,) + self.shape[d:], self.strides[:d] + (1,) + self.strides[d:],
                          self.offset)

    def squeeze_dim(self, dim):
        d = dim % self.ndim
        if self.shape[d] != 1:
            raise ValueError(f"squeeze_dim({dim}) of {self.shape}: dim is not 1")
        return self._view(self.shape[:d] + self.shape[d + 1:], self.strides[:d] + self.strides[d + 1:], self.offset)

    def reshape_dim(self, dim, shape):
        d = dim % self.ndim
        shape = tuple(shape)
        if _prod(shape) != self.shape[d]:
            raise ValueError(f"reshape_dim({dim}, {shape}) of {self.shape}: sizes differ")
        inner = _contiguous_strides(shape)
        strides = tuple(x * self.strides[d] for x in inner)
        return self._view(self.shape[:d] + shape + self.shape[d + 1:], self.strides[:d] + strides +
                          self.strides[d + 1:], self.offset)

    def flatten_dims(self, start_dim, end_dim):
        s, e = start_dim % self.ndim, end_dim % self.ndim
        new = self.shape[:s] + (_prod(self.shape[s:e + 1]),) + self.shape[e + 1:]
        return self.reshape(new)

    def is_contiguous(self):
        """Row-major contiguity of the view; on-chip tensors skip the partition dim (partitions are separate
        memories)."""
        if self._onchip:
            return self.strides[1:] == _contiguous_strides(self.shape[1:])
        return self.strides == _contiguous_strides(self.shape)

    def get_pattern(self):
        """The view's access pattern ``[[stride, count], ...]`` (one pair per dim, in shape order)."""
        return [[s, n] for s, n in zip(self.strides, self.shape)]

    def reinterpret_cast(self, dtype):
        return self.view(dtype)

    def ap(self, pattern, offset=None, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None):
        """Raw access pattern over the underlying storage: ``pattern = [[stride, count], ...]`` in elements;
        ``offset`` (elements) is added to this view's offset (None keeps it). For SBUF/PSUM the first pair is the
        partition dim and its stride must equal the storage's free size. ``scalar_offset`` (a VirtualRegister or
        [1,1] tile) adds ``value * stride(indirect_dim)``; ``vector_offset`` (a [P,1] integer SBUF tile, on an HBM
        tensor) makes dim ``indirect_dim`` per-partition rows, resolved by the DMA that uses the view."""
        if scalar_offset is not None and vector_offset is not None:
            raise ConstraintError("rule indirect.exclusive: ap() takes scalar_offset or vector_offset, not both")
        if self._ind is not None and (scalar_offset is not None or vector_offset is not None):
            raise ConstraintError("rule indirect.chain: an indirect view cannot be re-indirected")
        pattern = [(int(s), int(n)) for s, n in pattern]
        t = self if dtype is None else self.view(dtype)
        st = self._st
        if st.buffer in ONCHIP and pattern[0][1] > 1 and pattern[0][0] != st.free_size:
            raise ConstraintError(f"rule ap.partition_stride: ap operand '{self.name}' partition stride "
                                  f"{pattern[0][0]} must equal the storage free size (limit {st.free_size})")
        off = t.offset + int(offset or 0)
        ind = self._ind
        if not 0 <= indirect_dim < len(pattern):
            raise ConstraintError(f"rule indirect.dim: indirect_dim {indirect_dim} is not a dim of pattern {pattern}")
        if scalar_offset is not None:
            off += _dynamic_value(scalar_offset, "ap(scalar_offset=)") * pattern[indirect_dim][0]
            ind = ("scalar", off, indirect_dim)
        if vector_offset is not None:
            if st.buffer in ONCHIP:
                raise ConstraintError("rule indirect.buffer: ap(vector_offset=) indexes an HBM tensor; "
                                      f"{self.name!r} is in {st.buffer}")
            if not isinstance(vector_offset, NkiTensor) or vector_offset._st.buffer != "sbuf" or \
                    vector_offset.dtype.kind not in "iu" or vector_offset._free() != 1:
                raise ConstraintError("rule indirect.vector_offset: vector_offset must be an integer [P,1] SBUF "
                                      "tile")
            if pattern[indirect_dim][1] != vector_offset.shape[0]:
                raise ConstraintError(f"rule indirect.vector_offset: pattern dim {indirect_dim} count "
                                      f"{pattern[indirect_dim][1]} must equal vector_offset partitions "
                                      f"{vector_offset.shape[0]}")
            return NkiTensor(st, t._flat, tuple(n for _, n in pattern), tuple(s for s, _ in pattern), off, t.dtype,
                             ("vector", vector_offset, indirect_dim))
        lo = off + sum(s * (n - 1) for s, n in pattern if s < 0)
        hi = off + sum(s * (n - 1) for s, n in pattern if s > 0)
        if lo < 0 or hi >= t._flat.size:
            raise IndexError(f"ap pattern {pattern} offset {off} reaches elements {lo}..{hi} outside tensor "
                             f"{self.name!r} storage of {t._flat.size} elements")
        return NkiTensor(st, t._flat, tuple(n for _, n in pattern), tuple(s for s, _ in pattern), off, t.dtype, ind)


def _dynamic_value(x, where):
    """The value of a dynamic index: a VirtualRegister, or a one-element integer SBUF/HBM tile (read here: the
    interpreter executes eagerly, so the value the device would use is known)."""
    if isinstance(x, NkiTensor):
        if x.size != 1 or x.dtype.kind not in "iu":
            raise ConstraintError(f"rule indirect.scalar: {where} needs a one-element integer tile, got "
                                  f"{list(x.shape)} {_dt.name(x.dtype)}")
        return int(x._v.reshape(-1)[0])
    get = getattr(x, "_get", None)
    if get is not None:
        return get(where)
    if isinstance(x, (int, np.integer)):
        return int(x)
    raise ConstraintError(f"rule indirect.scalar: {where} needs a VirtualRegister or a [1,1] integer tile, got "
                          f"{type(x).__name__}")
