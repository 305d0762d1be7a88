"""Conformance of kernels.sim's public surface with the official NKI 0.6 API (tests/nki_api_table.py, written from
AWS's API reference pages): every official name is present with the documented parameter names, order and
defaults, or is listed in ``MISSING`` with a reason; and nothing else is public in ``nki``, ``nl``, ``nisa``,
``nki.collectives`` and ``nki.typing`` (so a kernel that passes here uses only names that exist on a device)."""
import enum
import inspect
import types

import numpy as np
import pytest

import nki_api_table as T
from kernels.sim import nki, nl, nisa

MODULES = {"nki": (nki, T.NKI), "nl": (nl, T.NL), "nisa": (nisa, T.NISA),
           "collectives": (nki.collectives, T.COLLECTIVES), "typing": (nki.typing, T.TYPING)}
_LITERALS = (type(None), bool, int, float, str, tuple, list)


def public(mod):
    return {k for k in vars(mod) if not k.startswith("_")}


def render_default(v):
    """A default as the docs write it: enum members as ``cls.member``, nl/nisa objects by their name."""
    if isinstance(v, enum.Enum) and not isinstance(v, nl.MemoryRegion):
        return f"{type(v).__name__}.{v.name}"
    if not isinstance(v, _LITERALS):
        for mod in (nl, nisa):
            for k, obj in vars(mod).items():
                if obj is v and not k.startswith("_"):
                    return k
    if isinstance(v, nl.MemoryRegion):
        return v.name
    return repr(v)


def render_signature(fn):
    parts = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={render_default(p.default)}")
    return "(" + ", ".join(parts) + ")"


def resolve(root, path):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_entry(mod, name, entry):
    obj = getattr(mod, name)
    if isinstance(entry, str) and entry.startswith("("):
        assert callable(obj), f"{name} is not callable"
        assert render_signature(obj) == entry, f"{name}{render_signature(obj)} != official {name}{entry}"
    elif entry == "dtype":
        assert isinstance(obj, np.dtype), f"{name} is not a dtype"
        assert isinstance(obj, nl.DType)
    elif entry == "buffer":
        assert isinstance(obj, nl.MemoryRegion), f"{name} is not an nl.MemoryRegion"
    elif entry == "op":
        assert obj is not None and callable(obj)
    elif entry == "module":
        assert isinstance(obj, types.ModuleType)
    elif entry == "const":
        assert obj is not None
    elif entry[0] == "alias":
        assert obj is resolve(nki if mod is nki else mod, entry[1]), f"{name} is not {entry[1]}"
    elif entry[0] == "enum":
        assert isinstance(obj, type) and issubclass(obj, enum.Enum) and not issubclass(obj, int), \
            f"{name} must be a plain Enum"
        assert {m.name for m in obj} == set(entry[1]), f"{name} members {[m.name for m in obj]}"
        for member, value in entry[1].items():
            if value is not None:
                assert getattr(obj, member).value == value, f"{name}.{member} = {getattr(obj, member).value}"
    elif entry[0] == "class":
        assert isinstance(obj, type), f"{name} is not a class"
        for base in entry[1]:
            assert base in {b.__name__ for b in obj.__mro__}, f"{name} does not derive from {base}"
        for meth, sig in entry[2].items():
            got = render_signature(getattr(obj, meth))
            assert got == sig, f"{name}.{meth}{got} != official {sig}"
    else:
        raise AssertionError(f"bad table entry {name}: {entry!r}")


@pytest.mark.parametrize("modname", sorted(MODULES))
def test_every_official_name_is_present_or_listed_missing(modname):
    mod, table = MODULES[modname]
    errors = []
    for name, entry in table.items():
        if (modname, name) in T.MISSING:
            errors.append(f"{name} is both in the table and listed missing")
            continue
        if not hasattr(mod, name):
            errors.append(f"{modname}.{name} is missing and not listed in MISSING")
            continue
        try:
            check_entry(mod, name, entry)
        except AssertionError as e:
            errors.append(f"{modname}.{name}: {e}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("modname", sorted(MODULES))
def test_no_public_name_beyond_the_official_surface(modname):
    mod, table = MODULES[modname]
    extra = sorted(public(mod) - set(table))
    assert not extra, f"{modname} exports names the official API does not have: {extra}"


def test_missing_names_are_really_absent():
    for (modname, name), reason in T.MISSING.items():
        assert reason
        assert not hasattr(MODULES[modname][0], name), f"{modname}.{name} exists but is listed missing"


def test_tensor_has_no_public_method_beyond_the_official_ones():
    official = set(T.NL["NkiTensor"][2]) | set(T.TENSOR_ATTRIBUTES)
    # size/itemsize/nbytes: numpy-style facts the docs use on tensors (e.g. ``index.size`` in nisa.local_gather).
    official |= {"size", "itemsize", "nbytes"}
    extra = sorted(k for k in dir(nl.NkiTensor) if not k.startswith("_") and k not in official)
    assert not extra, f"NkiTensor has non-official public attributes {extra}"


def test_tile_size_has_the_documented_attributes():
    """nl.tile_size: exactly the attributes of its page; sbuf_size_bytes is the total over the 128 partitions and
    total_available_sbuf_size the usable bytes of one partition ("Despite the name, ... per partition")."""
    ts = nl.tile_size
    assert sorted(k for k in vars(ts) if not k.startswith("_")) == sorted(T.TILE_SIZE)
    assert ts.sbuf_size_bytes == 128 * 192 * 1024
    assert ts.total_available_sbuf_size == ts.sbuf_fmax_bytes == 4 * ts.sbuf_fmax


def test_install_as_nki_exposes_the_submodules():
    """``import nki.collectives`` and ``import nki.typing`` resolve once the interpreter is installed (the SDK
    modules of the same names); kernels.sim.install_as_nki registers them."""
    import sys
    import kernels.sim as ks
    saved = {k: sys.modules.get(k) for k in ("nki", "nki.language", "nki.isa", "nki.collectives", "nki.typing")}
    if saved["nki"] is not None and saved["nki"] is not ks.nki:
        pytest.skip("a real nki package is imported")
    try:
        ks.install_as_nki()
        import nki.collectives as nc  # noqa: F401
        import nki.typing as nt
        assert nc is ks.nki.collectives and nt is ks.nki.typing
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
