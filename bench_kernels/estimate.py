"""Estimate any NKI kernel's time on trn1 without a device: run it on the interpreter, cost its trace.

    python -m bench_kernels.estimate path/to/kernel.py:function --shapes x=4096x4096:bfloat16 w=4096:bfloat16 \\
        [--arg eps=1e-6] [--trace PREFIX] [--seed 0] [--launcher]
    python -m bench_kernels.estimate kernel.py:fn --shapes '{"x": {"shape": [4096, 4096], "dtype": "bfloat16"},
                                                            "eps": 1e-6}'
    python -m bench_kernels.estimate kernel.py:fn --shapes spec.json

The function is called with keyword arguments named as in --shapes/--arg, so the names must be its parameter
names. Tensors: NAME=D0xD1x...[:DTYPE] (DTYPE default float32; float32, float16, bfloat16, float8_e4m3,
float8_e4m3fn, float8_e5m2, int32, int16, int8, uint8, uint16, uint32, bool), filled with seeded random values
(floats standard normal, integers 0..15, bools random). Non-tensor arguments: --arg NAME=PYTHON_LITERAL. JSON
spec (inline or a .json file): {"name": {"shape": [...], "dtype": "..."} | [[...], "dtype"] | literal, ...}.

The kernel: an ``@nki.jit`` function or a plain kernel function (run through ``nki.simulate``) taking numpy
arrays; with --launcher, a Python function that takes torch CPU tensors and launches kernels itself (such as
kernels/rmsnorm.py:rms_norm_fwd). Files written for the official ``nki`` package (``import nki``) run unmodified:
the interpreter is registered as ``nki`` first (kernels.sim.install_as_nki) where no real nki is installed.

Prints kernels.sim.cost's summary (estimated time, bound engine, TensorE utilisation, HBM bandwidth, busy per
engine, critical path) and a roofline floor from the executed matmul FLOPs and the inputs' + outputs' bytes.
--trace PREFIX writes PREFIX.png (engine timeline) and PREFIX.json (Chrome trace). Every figure is an estimate
from documented per-instruction formulas (kernels.sim.cost), not a measurement.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import os
import sys

import numpy as np

PROG = "python -m bench_kernels.estimate"
_NP_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3", "float8_e4m3fn", "float8_e5m2", "int32", "int16",
              "int8", "uint8", "uint16", "uint32", "bool")


class SpecError(Exception):
    """Bad command line or spec: one line, exit status 2."""


# ----------------------------------------------------------------------------------------------- the spec
def _dtype(name, where):
    if name not in _NP_DTYPES:
        raise SpecError(f"{where}: unknown dtype {name!r}; known: {', '.join(_NP_DTYPES)}")
    from kernels.sim import dtypes
    if name == "bool":
        return np.dtype(np.bool_)
    return getattr(dtypes, name, None) or np.dtype(name)


def _dims(values, where):
    try:
        dims = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: shape must be positive integers, got {values!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise SpecError(f"{where}: shape must be positive integers, got {values!r}")
    return dims


def parse_tensor(item):
    """'x=4096x4096:bfloat16' -> ('x', (4096, 4096), dtype)."""
    name, eq, rest = item.partition("=")
    if not eq or not name.isidentifier():
        raise SpecError(f"--shapes {item!r}: expected NAME=D0xD1[:DTYPE], e.g. x=4096x4096:bfloat16")
    dims, _, dt = rest.partition(":")
    return name, _dims(dims.split("x"), f"--shapes {item!r}"), _dtype(dt or "float32", f"--shapes {item!r}")


def _json_spec(text, where):
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: the JSON spec must be an object {{name: tensor or value}}")
    tensors, scalars = {}, {}
    for name, v in spec.items():
        w = f"{where}: {name!r}"
        if isinstance(v, dict):
            if "shape" not in v:
                raise SpecError(f"{w}: a tensor object needs \"shape\" (and optional \"dtype\")")
            tensors[name] = (_dims(v["shape"], w), _dtype(v.get("dtype", "float32"), w))
        elif isinstance(v, list) and len(v) == 2 and isinstance(v[0], list):
            tensors[name] = (_dims(v[0], w), _dtype(v[1], w))
        else:
            scalars[name] = v
    return tensors, scalars


def parse_spec(shapes, args):
    """(tensors {name: (shape, dtype)}, scalars {name: value}) from --shapes items and --arg items."""
    tensors, scalars = {}, {}
    for item in shapes or ():
        s = item.strip()
        if s.startswith("{"):
            t, sc = _json_spec(s, "--shapes JSON")
        elif s.endswith(".json"):
            if not os.path.isfile(s):
                raise SpecError(f"--shapes {s}: no such JSON file")
            with open(s) as f:
                t, sc = _json_spec(f.read(), s)
        else:
            name, shape, dt = parse_tensor(s)
            t, sc = {name: (shape, dt)}, {}
        tensors.update(t)
        scalars.update(sc)
    for item in args or ():
        name, eq, text = item.partition("=")
        if not eq or not name.isidentifier():
            raise SpecError(f"--arg {item!r}: expected NAME=VALUE (a Python literal), e.g. eps=1e-6")
        try:
            scalars[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SpecError(f"--arg {item!r}: {text!r} is not a Python literal (number, True/False, string, "
                            "tuple)") from None
    both = set(tensors) & set(scalars)
    if both:
        raise SpecError(f"argument {sorted(both)[0]!r} given both as a tensor and as a value")
    return tensors, scalars


def random_inputs(tensors, seed=0):
    """Seeded random arrays for {name: (shape, dtype)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dt) in tensors.items():
        if dt == np.bool_:
            out[name] = rng.random(shape) < 0.5
        elif np.issubdtype(dt, np.integer):
            out[name] = rng.integers(0, 16, shape).astype(dt)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(dt)
    return out


# ---------------------------------------------------------------------------------------------- the kernel
def load_function(target):
    """'path/to/file.py:function' -> the function object."""
    path, colon, fname = target.rpartition(":")
    if not colon or not path or not fname:
        raise SpecError(f"{target!r}: expected path/to/kernel.py:function")
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such file")
    if importlib.util.find_spec("nki") is None:       # files written for `import nki` run on the interpreter
        from kernels.sim import install_as_nki
        install_as_nki()
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)                    # sibling imports of the kernel file
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_bench_estimate_{stem}", path)
    if spec is None:
        raise SpecError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:           # a syntax or import error of the kernel file: say where
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise SpecError(f"{path}{where}: loading it raised {type(e).__name__}: {e}") from None
    fn = getattr(mod, fname, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod.__name__)
        raise SpecError(f"{path}: no function {fname!r} (functions defined there: {', '.join(names) or 'none'})")
    return fn


def _check_names(fn, names, target):
    sig = inspect.signature(getattr(fn, "fn", fn))
    params = sig.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [n for n in names if n not in params]
    if unknown:
        raise SpecError(f"{target}: no parameter {unknown[0]!r} (parameters: {', '.join(params)})")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in names
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise SpecError(f"{target}: missing inputs for parameter(s) {', '.join(missing)} (give them in --shapes "
                        "or --arg)")


def run_kernel(fn, inputs, launcher=False):
    """Call the kernel on the interpreter while recording; returns (trace, outputs)."""
    from kernels.sim import nki, trace
    from kernels.sim.jit import Kernel
    if launcher:
        inputs = {k: _to_torch(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
        call = fn
    else:
        call = fn if isinstance(fn, Kernel) else nki.simulate(fn)
    with trace.record() as tr:
        out = call(**inputs)
    return tr, out


def _to_torch(a):
    import torch
    if a.dtype.kind == "V" and a.dtype.name != "bfloat16":
        raise TypeError(f"--launcher passes torch tensors: dtype {a.dtype.name} has no conversion here")
    if a.dtype.name in ("bfloat16", "float16"):              # via float32: exact
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16 if a.dtype.name == "bfloat16"
                                                          else torch.float16)
    return torch.from_numpy(a)


def _nbytes(obj):
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        return int(obj.nbytes)
    if hasattr(obj, "element_size"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("target", help="path/to/kernel.py:function")
    ap.add_argument("--shapes", nargs="+", metavar="SPEC", help="tensor inputs: NAME=D0xD1[:DTYPE] ... or JSON")
    ap.add_argument("--arg", action="append", metavar="NAME=VALUE", help="non-tensor argument (Python literal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launcher", action="store_true", help="the function takes torch CPU tensors and launches "
                                                            "kernels itself")
    ap.add_argument("--trace", metavar="PREFIX", help="write PREFIX.png (timeline) and PREFIX.json (Chrome trace)")
    a = ap.parse_args(argv)
    try:
        tensors, scalars = parse_spec(a.shapes, a.arg)
        fn = load_function(a.target)
        _check_names(fn, list(tensors) + list(scalars), a.target)
    except SpecError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    inputs = random_inputs(tensors, a.seed)
    try:
        tr, out = run_kernel(fn, {**inputs, **scalars}, a.launcher)
    except Exception as e:           # the kernel's own error (interpreter rule, Python error): one clear line
        print(f"{PROG}: error: {a.target} raised {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not tr.instructions:
        print(f"{PROG}: error: {a.target} executed no NKI instruction on kernels.sim (does it import a real nki, "
              "or not launch a kernel?)", file=sys.stderr)
        return 1
    from kernels.sim import cost
    rep = cost.estimate(tr)
    desc = ", ".join(f"{n}[{'x'.join(map(str, s))}]:{np.dtype(d).name}" for n, (s, d) in tensors.items())
    print(f"{a.target}({desc}{', ' if desc and scalars else ''}{', '.join(f'{k}={v!r}' for k, v in scalars.items())})")
    print(rep.summary())
    min_bytes = sum(v.nbytes for v in inputs.values()) + _nbytes(out)
    floor = cost.roofline_floor_us(rep.flops, min_bytes)
    print(f"roofline floor {floor:.2f} us = max(executed matmul FLOPs / TensorE bf16 peak, (inputs + outputs) "
          f"{min_bytes:,} B / HBM bandwidth): {100 * floor / rep.total_us:.1f}% of the estimate")
    if a.trace:
        from bench_kernels import charts
        png, js = charts.write_timeline(a.trace, rep, a.target, labels=charts.dma_labels(tr.instructions))
        print(f"wrote {png} (engine timeline), {js} (Chrome trace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
