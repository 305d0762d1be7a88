"""NKI data types as numpy dtypes (bf16/fp8 through ml_dtypes) and the cast used on every write.

``tfloat32`` is stored as float32 whose mantissa is rounded (nearest-even) to 10 bits on every write. Its dtype
object is the byte-swapped float32 dtype carrying ``metadata={"nki": "tfloat32"}``: a distinct dtype
(``tfloat32 != float32``, as in NKI) that is never used for storage (tiles of it hold native float32 values);
:func:`is_tf32` recognises it. A plain non-native-order numpy dtype from a caller's array is normalised to the
native one.
"""
import ml_dtypes
import numpy as np

float32 = np.dtype(np.float32)
tfloat32 = np.dtype(np.dtype(np.float32).newbyteorder("S").str, metadata={"nki": "tfloat32"})
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
int8, int16, int32 = np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)
uint8, uint16, uint32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)
bool_ = np.dtype(np.bool_)
float8_e8m0fnu = np.dtype(ml_dtypes.float8_e8m0fnu)


def _packed(name):
    # NeuronCore-v4 4x-packed MX types: 32-bit containers only nc_matmul_mx/quantize_mx interpret
    return np.dtype(np.uint32, metadata={"nki": name})


float8_e5m2_x4 = _packed("float8_e5m2_x4")
float8_e4m3fn_x4 = _packed("float8_e4m3fn_x4")
float4_e2m1fn_x4 = _packed("float4_e2m1fn_x4")

ALL = dict(float32=float32, tfloat32=tfloat32, float16=float16, bfloat16=bfloat16, float8_e4m3=float8_e4m3,
           float8_e4m3fn=float8_e4m3fn, float8_e5m2=float8_e5m2, int8=int8, int16=int16, int32=int32,
           uint8=uint8, uint16=uint16, uint32=uint32, bool_=bool_, float8_e8m0fnu=float8_e8m0fnu,
           float8_e5m2_x4=float8_e5m2_x4, float8_e4m3fn_x4=float8_e4m3fn_x4, float4_e2m1fn_x4=float4_e2m1fn_x4)
_FLOATS = {float32, tfloat32, float16, bfloat16, float8_e4m3, float8_e4m3fn, float8_e5m2, float8_e8m0fnu}
_BY_NAME = {k: v for k, v in ALL.items()}
_BY_NAME.update(fp32=float32, fp16=float16, bf16=bfloat16, tf32=tfloat32, bool=bool_, float=float32)


def is_tf32(dt):
    return dt.metadata is not None and dt.metadata.get("nki") == "tfloat32"


_NAMES = {id(v): k for k, v in ALL.items()}


def name(dt):
    """NKI name of a dtype ("bfloat16", "tfloat32", ...)."""
    n = _NAMES.get(id(dt))
    if n is None:
        md = dt.metadata
        n = md["nki"] if md is not None and "nki" in md else dt.name
    return n


def is_packed(dt):
    md = dt.metadata
    return md is not None and md.get("nki", "").endswith("_x4")


def is_float(dt):
    return dt in _FLOATS


def is_int(dt):
    return dt.kind in "iub"


def normalize(dt, where="dtype"):
    """Accept nl dtypes, numpy dtypes/types, names and torch dtypes; refuse what NKI does not have."""
    if isinstance(dt, np.dtype):
        out = dt
        if not out.isnative and not is_tf32(out):
            out = out.newbyteorder("=")
    elif isinstance(dt, str):
        if dt not in _BY_NAME:
            raise TypeError(f"{where}: unknown NKI dtype {dt!r}")
        out = _BY_NAME[dt]
    else:
        mod = type(dt).__module__
        if mod.startswith("torch"):
            out = from_torch(dt)
        else:
            try:
                out = np.dtype(dt)
            except TypeError:
                raise TypeError(f"{where}: {dt!r} is not a dtype") from None
    if out.kind not in "iubf" and out not in _FLOATS:
        raise TypeError(f"{where}: dtype {out} is not supported by NKI (no float64/int64/complex)")
    if out.itemsize > 4:
        raise TypeError(f"{where}: dtype {out} is not supported by NKI (no 64-bit types)")
    return out


def from_torch(tdt):
    import torch
    table = {torch.float32: float32, torch.float16: float16, torch.bfloat16: bfloat16, torch.int8: int8,
             torch.int16: int16, torch.int32: int32, torch.uint8: uint8, torch.bool: bool_}
    for attr, dt in (("float8_e4m3fn", float8_e4m3fn), ("float8_e5m2", float8_e5m2), ("uint16", uint16),
                     ("uint32", uint32)):
        if hasattr(torch, attr):
            table[getattr(torch, attr)] = dt
    if tdt not in table:
        raise TypeError(f"torch dtype {tdt} has no NKI equivalent")
    return table[tdt]


def round_tf32(x):
    """Round float32 values to a 10-bit mantissa, nearest-even (Inf/NaN kept)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    finite = np.isfinite(x)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return np.where(finite, rounded, bits).view(np.float32)


_U16, _U32 = np.dtype(np.uint16), np.dtype(np.uint32)
_BITS_MIN = 1024      # arrays below this size convert through ml_dtypes (same bits; fewer numpy calls)


def to_f32(a):
    """float32 values of array ``a`` (a new array). bf16 widens by a 16-bit shift of its bits: bit-identical to
    ml_dtypes' conversion (exact, NaN payloads kept; tests/test_sim_speed_paths.py checks all 2^16 values) and
    about 3x faster on the hot path (every matmul and engine operand)."""
    if a.dtype == bfloat16 and a.size >= _BITS_MIN:
        w = a.view(_U16).astype(_U32)
        w <<= 16
        return w.view(np.float32)
    return a.astype(np.float32)


def _bf16_bits(v):
    """uint32 array holding the bfloat16 bits of float32 array ``v`` (1-d or more): round-to-nearest-even,
    ``(u + 0x7FFF + bit16(u)) >> 16``; NaN becomes ``sign | 0x7FC0``. ``v`` is only read. A strided ``v`` (a
    PSUM bank slice, a transposed view) is copied to C order first: its three reads (shift, add, NaN test) then
    run on contiguous memory, 25-30% faster on [128, 512] bank slices than strided reads."""
    if not v.flags.c_contiguous:
        v = np.ascontiguousarray(v)
    u = v.view(_U32)
    t = u >> 16
    t &= 1
    t += u
    t += 0x7FFF
    t >>= 16
    if v.size and np.isnan(v.max()):              # max propagates NaN: one cheap pass decides the fix-up
        nan = np.isnan(v)
        t[nan] = ((u[nan] >> 16) & 0x8000) | 0x7FC0
    return t


def f32_to_bf16(v):
    """bfloat16 of the float32 array ``v``, round-to-nearest-even on the bits: ``(u + 0x7FFF + bit16(u)) >> 16``
    (finite values, denormals and overflow to Inf alike); NaN becomes ``sign | 0x7FC0`` (payload dropped). This is
    ml_dtypes' conversion bit for bit (tests/test_sim_speed_paths.py: every pattern of the high 16 bits with the
    rounding-relevant low halves, and all NaNs), about 2x faster and without its "invalid value" warning."""
    if v.size < _BITS_MIN:                          # a few ufunc calls cost more than ml_dtypes' loop here
        return v.astype(bfloat16)
    if v.ndim == 0:                                 # ufuncs on 0-d arrays return scalars
        return f32_to_bf16(v.reshape(1)).reshape(())
    r = _bf16_bits(v).astype(_U16)
    return r.view(bfloat16)


def cast_into(out, values, dt):
    """``out[...] = cast(values, dt)``, ``out`` being the storage view of a tensor of dtype ``dt``. A float32 ->
    bfloat16 store narrows straight into ``out`` (one pass and one temporary fewer than cast-then-assign; the same
    bits: f32_to_bf16's arithmetic, with ``values`` read in full before ``out`` is written, so they may alias)."""
    v = values if isinstance(values, np.ndarray) else np.asarray(values)
    if dt == bfloat16 and v.dtype == float32 and v.shape == out.shape and v.ndim and v.size >= _BITS_MIN:
        t = _bf16_bits(v)                           # computed in full before out is written
        out.view(_U16)[...] = t
        return
    out[...] = cast(v, dt)


def same_dtype_roundtrip(a):
    """``cast(to_f32(a), a.dtype)`` for a float32 or bfloat16 array, as a new contiguous array of a's shape: the
    values' own bits, except that a bf16 NaN becomes ``sign | 0x7FC0`` (what the fp32 -> bf16 conversion makes of
    every NaN)."""
    if a.dtype != bfloat16:
        return np.array(a, dtype=a.dtype, copy=True)
    if a.size < _BITS_MIN:
        return a.astype(np.float32).astype(bfloat16)
    if a.ndim == 0:
        return same_dtype_roundtrip(a.reshape(1)).reshape(())
    u = np.array(a.view(_U16), copy=True)
    mag = u & 0x7FFF
    if mag.max(initial=0) > 0x7F80:
        nan = mag > 0x7F80
        u[nan] = (u[nan] & 0x8000) | 0x7FC0
    return u.view(bfloat16)


def full(n, fill, dt):
    """``np.full(n, fill, dt)``; bf16 is filled through its bit pattern (ml_dtypes' own fill converts element by
    element, ~10x slower for a fresh tile)."""
    if dt == bfloat16:
        bits = np.array(fill, dt).view(_U16)
        return np.full(n, bits, _U16).view(dt)
    return np.full(n, fill, dtype=dt)


def cast(values, dt):
    """Cast computed values (usually fp32) to storage dtype ``dt`` as the engines do on write:
    floats round to nearest-even; float->int rounds to nearest-even and saturates (NaN -> 0); same dtype is
    bit-exact."""
    v = np.asarray(values)
    if v.dtype == dt and not is_tf32(dt):
        return v
    if is_tf32(dt):
        return round_tf32(v)
    if dt.kind in "iu" and v.dtype.kind == "f":
        info = np.iinfo(dt)
        v = np.rint(v.astype(np.float64, copy=False))
        v = np.nan_to_num(v, nan=0.0, posinf=info.max, neginf=info.min)
        return np.clip(v, info.min, info.max).astype(dt)
    if dt.kind == "b":
        return v != 0
    if v.dtype.kind in "iub" and dt in _FLOATS and dt != float32:
        v = v.astype(np.float32)
    if dt == float32:
        return to_f32(v)
    if dt == bfloat16 and v.dtype == float32:
        return f32_to_bf16(v)
    return v.astype(dt)
