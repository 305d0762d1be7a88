"""Operator descriptors shared by ``nl`` (as callable wrappers) and ``nisa`` (as the ``op=`` argument).

``nl.add`` etc. are :class:`Op` objects: passing one as ``op=`` selects the ALU function; calling one runs the
experimental ``nl`` wrapper (set by ``language.py``). All float math is fp32 (numpy float32 arrays in, out);
activation functions are exact numpy formulas, not the ScalarE polynomial approximations.
"""
import numpy as np

_f32 = np.float32


class Op:
    __slots__ = ("name", "kind", "fn", "unary", "reduce", "wrapper", "identity", "min_version", "__doc__",
                 "__signature__")

    def __init__(self, name, kind, fn=None, unary=None, reduce=None, identity=None, doc=None, min_version=2):
        self.name = name
        self.kind = kind          # "arith" | "bitvec" | "compare" | "logical" | "unary" | "reduction"
        self.fn = fn              # binary: fn(a, b) on float32 (or int for bitvec)
        self.unary = unary        # activation function on float32
        self.reduce = reduce      # reduction along trailing axes: reduce(x, axes)
        self.identity = identity  # reduction identity (initial register value)
        self.wrapper = None       # nl wrapper (set by language.py)
        self.min_version = min_version   # first NeuronCore generation that has the operator
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
    ("right_shift", "bitvec", np.right_shift, None, None),   # logical: isa.py shifts the unsigned bit pattern
]:
    BINARY[_name] = Op(_name, _kind, fn=_fn, reduce=_red, identity=_id)


def _abs_pick(larger):
    # the input of larger (smaller) magnitude, keeping its sign; ties return y (nl.abs_max/abs_min docs)
    def f(a, b):
        a, b = np.broadcast_arrays(a, b)
        pick_a = np.abs(a) > np.abs(b) if larger else np.abs(a) < np.abs(b)
        return np.where(pick_a, a, b)
    return f


BINARY["abs_max"] = Op("abs_max", "arith", fn=_abs_pick(True), min_version=4)
BINARY["abs_min"] = Op("abs_min", "arith", fn=_abs_pick(False), min_version=4)
# nl.bypass: "no-op operator that passes data through unchanged" (op0/op1 of activate2)
BYPASS = Op("bypass", "bypass", fn=lambda a, b: a)
# nl.average: the mean reduction of nisa.tensor_partition_reduce (spec 2.5 "add/average/max/bitwise_or/and")
AVERAGE = Op("average", "reduction", reduce=lambda x, ax: np.mean(x, axis=ax, dtype=_f32))


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
    ("copy", lambda x: x),
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
    ("prelu", lambda x: np.maximum(x, _f32(0))),   # slope 0 for x < 0 unless activate2(relu_param=)
]:
    UNARY[_name] = Op(_name, "unary", unary=_quiet(_fn))

# Which operators each instruction accepts, and where the rule comes from (docs pages under
# awsdocs-neuron.readthedocs-hosted.com/en/v2.32.0/nki/api/; spec = /work/shared/docs/nki-spec.md).
OP_RULES = {
    # "Supported Activation Functions for NKI ISA" (nki.api.shared, nki-act-func; spec 2.4): no cos/tan/floor/...
    "activation": ("copy", "square", "sigmoid", "relu", "prelu", "gelu", "gelu_dx", "gelu_apprx_tanh",
                   "gelu_apprx_sigmoid", "gelu_apprx_sigmoid_dx", "silu", "silu_dx", "tanh", "softplus", "mish",
                   "erf", "erf_dx", "exp", "log", "sin", "arctan", "sqrt", "rsqrt", "reciprocal", "sign", "abs"),
    # nki.isa.tensor_scalar: op0 may be a unary operator ("Must be None or 0 when op0 is a unary operator (e.g.,
    # nl.abs)"); the unary ALU operators of the nki-aluop table
    "tensor_scalar.unary": ("abs", "square", "relu", "rsqrt", "reciprocal"),
    # 0.4 release notes: "square and relu are now accepted as op0 on trn3"
    "tensor_scalar.unary_v4": ("square", "relu"),
    # nki.isa.tensor_scalar_reduce: "The reduce_op can be any of nl.add, nl.multiply, nl.max or nl.min"
    "tensor_scalar_reduce.reduce_op": ("add", "multiply", "maximum", "minimum"),
    # nki.isa.tensor_scalar_reduce reduce_cmd: "Supported: reset_reduce (default), reduce, load_reduce"
    "tensor_scalar_reduce.reduce_cmd": ("reset_reduce", "reduce", "load_reduce"),
    # nki.isa.tensor_partition_reduce: "the reduction operator (add, max, bitwise_or, bitwise_and)"; spec 2.5 adds
    # average
    "tensor_partition_reduce": ("add", "maximum", "bitwise_or", "bitwise_and", "average"),
    # nki.isa.tensor_reduce: the "Legal reduction" column of nki-aluop (spec 2.5)
    "tensor_reduce": ("add", "subtract", "multiply", "maximum", "minimum", "bitwise_and", "bitwise_or",
                      "bitwise_xor", "logical_and", "logical_or", "logical_xor"),
    # nki.isa.range_select / affine_select comparison operators
    "compare": ("equal", "less", "less_equal", "greater", "greater_equal", "not_equal"),
    # nki.isa.tensor_scalar_cumulative: "Reduction operation (op1) is limited to add, subtract, mult, max, min"
    "tensor_scalar_cumulative.op1": ("add", "subtract", "multiply", "maximum", "minimum"),
}
OP_RULES = {k: frozenset(v) for k, v in OP_RULES.items()}   # membership tests on the per-instruction path
# nl functions that may be named as a reduce_op where a page says so (tensor_scalar_reduce: "nl.max or nl.min")
REDUCTION_NAMES = {"max": "maximum", "min": "minimum"}


def _not_an_op(op, instr, role, rule, what):
    from .errors import ConstraintError
    mod = getattr(type(op), "__module__", "") or ""
    if mod == "numpy" or type(op).__name__ in ("ufunc", "_ArrayFunctionDispatcher", "function") and \
            getattr(op, "__module__", "") == "numpy":
        hint = f"numpy's {getattr(op, '__name__', op)} is not an NKI operator; pass the nl operator (e.g. nl.add)"
    else:
        hint = f"{op!r} is not {what}"
    raise ConstraintError(f"rule {rule}: {instr} operand '{role}' {hint}")


def binary(op, instr, role="op", allowed=None, reduction_names=False):
    """The ALU operator ``op`` (an nl operator object), optionally restricted to the names in ``allowed``."""
    if not isinstance(op, Op):
        name = getattr(op, "name", None)
        if reduction_names and isinstance(name, str) and name in REDUCTION_NAMES and hasattr(op, "op_name"):
            op = BINARY[REDUCTION_NAMES[name]]
        else:
            _not_an_op(op, instr, role, "op.binary", "a binary ALU operator (nl.add, nl.maximum, ...)")
    if op.fn is None and op.reduce is None:
        _not_an_op(op, instr, role, "op.binary", "a binary ALU operator")
    if allowed is not None and op.name not in allowed:
        from .errors import ConstraintError
        raise ConstraintError(f"rule op.{instr}: {instr} operand '{role}' nl.{op.name} is not one of the operators "
                              f"{instr} accepts ({', '.join('nl.' + a for a in sorted(allowed))})")
    _require_version(op, instr, role)
    return op


def unary(op, instr, role="op", allowed=None):
    if not isinstance(op, Op) or op.unary is None:
        _not_an_op(op, instr, role, "op.activation", "an activation function (nl.exp, nl.copy, ...)")
    if allowed is not None and op.name not in allowed:
        from .errors import ConstraintError
        raise ConstraintError(f"rule op.{instr}: {instr} operand '{role}' nl.{op.name} is not in the {instr} "
                              f"function table ({', '.join('nl.' + a for a in sorted(allowed))})")
    return op


def _require_version(op, instr, role):
    if op.min_version > 2:
        from . import target
        target.require(op.min_version, instr, f"operand '{role}' nl.{op.name}")
