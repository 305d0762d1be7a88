"""Operator descriptors shared by ``nl`` (as callable wrappers) and ``nisa`` (as the ``op=`` argument).

``nl.add`` etc. are :class:`Op` objects: passing one as ``op=`` selects the ALU function; calling one runs the
experimental ``nl`` wrapper (set by ``language.py``). All float math is fp32 (numpy float32 arrays in, out);
activation functions are exact numpy formulas, not the ScalarE polynomial approximations.
"""
import numpy as np

_f32 = np.float32


class Op:
    __slots__ = ("name", "kind", "fn", "unary", "reduce", "wrapper", "identity", "__doc__")

    def __init__(self, name, kind, fn=None, unary=None, reduce=None, identity=None, doc=None):
        self.name = name
        self.kind = kind          # "arith" | "bitvec" | "compare" | "logical" | "unary" | "reduction"
        self.fn = fn              # binary: fn(a, b) on float32 (or int for bitvec)
        self.unary = unary        # activation function on float32
        self.reduce = reduce      # reduction along trailing axes: reduce(x, axes)
        self.identity = identity  # reduction identity (initial register value)
        self.wrapper = None       # nl wrapper (set by language.py)
        self.__doc__ = doc or f"nki.language.{name}"

    def __call__(self, *args, **kwargs):
        if self.wrapper is None:
            raise TypeError(f"nl.{self.name} cannot be called here")
        return self.wrapper(self, *args, **kwargs)

    def __repr__(self):
        return f"nl.{self.name}"


def _sub_reduce(x, axis):
    # x[..., 0] - x[..., 1] - ... along the (single, flattened) reduced axis
    return x[..., 0] - np.sum(x[..., 1:], axis=axis, dtype=_f32)


def _cmp(f):
    return lambda a, b: f(a, b).astype(_f32)


def _logical(f):
    return lambda a, b: f(a != 0, b != 0).astype(_f32)


def _safe_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(a, b)


def _pow(a, b):
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.power(a, b)


BINARY = {}
for _name, _kind, _fn, _red, _id in [
    ("add", "arith", np.add, lambda x, ax: np.sum(x, axis=ax, dtype=_f32), 0.0),
    ("subtract", "arith", np.subtract, _sub_reduce, 0.0),
    ("multiply", "arith", np.multiply, lambda x, ax: np.prod(x, axis=ax, dtype=_f32), 1.0),
    ("divide", "arith", _safe_div, None, None),
    ("maximum", "arith", np.maximum, lambda x, ax: np.max(x, axis=ax), -np.inf),
    ("minimum", "arith", np.minimum, lambda x, ax: np.min(x, axis=ax), np.inf),
    ("power", "arith", _pow, None, None),
    ("mod", "arith", np.mod, None, None),
    ("fmod", "arith", np.fmod, None, None),
    ("equal", "compare", _cmp(np.equal), None, None),
    ("not_equal", "compare", _cmp(np.not_equal), None, None),
    ("less", "compare", _cmp(np.less), None, None),
    ("less_equal", "compare", _cmp(np.less_equal), None, None),
    ("greater", "compare", _cmp(np.greater), None, None),
    ("greater_equal", "compare", _cmp(np.greater_equal), None, None),
    ("logical_and", "logical", _logical(np.logical_and), lambda x, ax: np.all(x != 0, axis=ax).astype(_f32), 1.0),
    ("logical_or", "logical", _logical(np.logical_or), lambda x, ax: np.any(x != 0, axis=ax).astype(_f32), 0.0),
    ("logical_xor", "logical", _logical(np.logical_xor),
     lambda x, ax: (np.sum(x != 0, axis=ax) % 2).astype(_f32), 0.0),
    ("bitwise_and", "bitvec", np.bitwise_and, lambda x, ax: np.bitwise_and.reduce(x, axis=ax), -1),
    ("bitwise_or", "bitvec", np.bitwise_or, lambda x, ax: np.bitwise_or.reduce(x, axis=ax), 0),
    ("bitwise_xor", "bitvec", np.bitwise_xor, lambda x, ax: np.bitwise_xor.reduce(x, axis=ax), 0),
    ("left_shift", "bitvec", np.left_shift, None, None),
    ("right_shift", "bitvec", np.right_shift, None, None),
]:
    BINARY[_name] = Op(_name, _kind, fn=_fn, reduce=_red, identity=_id)


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(_f32)


def _erf(x):
    # Abramowitz & Stegun 7.1.26 refined (max abs error 1.5e-7, below fp32 ulp at 1), evaluated in float64.
    x64 = x.astype(np.float64)
    s = np.sign(x64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t \
        * np.exp(-a * a)
    return (s * y).astype(_f32)


def _gelu(x):
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(_f32(2.0))))).astype(_f32)


def _gelu_dx(x):
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
    return (0.5 * (1.0 + _erf(x / np.sqrt(_f32(2.0)))) + x * pdf).astype(_f32)


def _gelu_tanh(x):
    return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(_f32)


def _silu_dx(x):
    s = _sigmoid(x)
    return (s * (1 + x * (1 - s))).astype(_f32)


def _softplus(x):
    return np.logaddexp(_f32(0), x).astype(_f32)


def _quiet(f):
    def g(x):
        with np.errstate(all="ignore"):
            return f(x).astype(_f32, copy=False)
    return g


UNARY = {}
for _name, _fn in [
    ("copy", lambda x: x), ("identity", lambda x: x),
    ("exp", np.exp), ("log", np.log), ("sqrt", np.sqrt),
    ("rsqrt", lambda x: _f32(1.0) / np.sqrt(x)), ("reciprocal", lambda x: _f32(1.0) / x),
    ("sigmoid", _sigmoid), ("tanh", np.tanh), ("square", np.square), ("relu", lambda x: np.maximum(x, _f32(0))),
    ("silu", lambda x: x * _sigmoid(x)), ("silu_dx", _silu_dx),
    ("gelu", _gelu), ("gelu_dx", _gelu_dx), ("gelu_apprx_tanh", _gelu_tanh),
    ("gelu_apprx_sigmoid", lambda x: x * _sigmoid(_f32(1.702) * x)),
    ("gelu_apprx_sigmoid_dx", lambda x: _sigmoid(_f32(1.702) * x) * (1 + _f32(1.702) * x *
                                                                        (1 - _sigmoid(_f32(1.702) * x)))),
    ("softplus", _softplus), ("mish", lambda x: x * np.tanh(_softplus(x))),
    ("erf", _erf), ("erf_dx", lambda x: (2 / np.sqrt(np.pi)) * np.exp(-x.astype(np.float64) ** 2)),
    ("sin", np.sin), ("cos", np.cos), ("tan", np.tan), ("arctan", np.arctan),
    ("sign", np.sign), ("abs", np.abs), ("negative", np.negative),
    ("ceil", np.ceil), ("floor", np.floor), ("trunc", np.trunc),
]:
    UNARY[_name] = Op(_name, "unary", unary=_quiet(_fn))

# numpy callables accepted as op= by legacy-style code
NUMPY_ALIASES = {
    np.add: "add", np.subtract: "subtract", np.multiply: "multiply", np.divide: "divide",
    np.maximum: "maximum", np.minimum: "minimum", np.max: "maximum", np.min: "minimum", np.sum: "add",
    np.power: "power", np.equal: "equal", np.not_equal: "not_equal", np.less: "less",
    np.less_equal: "less_equal", np.greater: "greater", np.greater_equal: "greater_equal",
    np.bitwise_and: "bitwise_and", np.bitwise_or: "bitwise_or", np.bitwise_xor: "bitwise_xor",
    np.left_shift: "left_shift", np.right_shift: "right_shift", np.logical_and: "logical_and",
    np.logical_or: "logical_or", np.logical_xor: "logical_xor", np.prod: "multiply",
}
NUMPY_UNARY = {np.exp: "exp", np.log: "log", np.sqrt: "sqrt", np.tanh: "tanh", np.square: "square",
               np.sin: "sin", np.cos: "cos", np.abs: "abs", np.sign: "sign", np.negative: "negative",
               np.reciprocal: "reciprocal", np.arctan: "arctan"}
REDUCTION_ALIASES = {}   # nl.sum -> add, nl.max -> maximum ... (filled by language.py)


def binary(op, instr, role="op"):
    from .errors import ConstraintError
    if isinstance(op, Op):
        if op.fn is not None:
            return op
        alias = REDUCTION_ALIASES.get(op.name)
        if alias:
            return BINARY[alias]
    else:
        name = getattr(op, "op_name", None)      # nl.sum / nl.max / ... used as an ALU op
        if name is None:
            try:
                name = NUMPY_ALIASES.get(op)
            except TypeError:
                name = None
        if name:
            return BINARY[name]
    raise ConstraintError(f"rule op.binary: {instr} operand '{role}' {op!r} is not a binary ALU operator")


def unary(op, instr, role="op"):
    from .errors import ConstraintError
    if isinstance(op, Op) and op.unary is not None:
        return op
    try:
        name = NUMPY_UNARY.get(op)
    except TypeError:
        name = None
    if name:
        return UNARY[name]
    raise ConstraintError(f"rule op.activation: {instr} operand '{role}' {op!r} is not an activation function")
