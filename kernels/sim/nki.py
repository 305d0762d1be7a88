"""The ``nki`` namespace of the interpreter: ``nki.jit``, ``nki.simulate``, ``nki.language``, ``nki.isa``,
``nki.collectives``, ``nki.typing`` and ``nki.dtype`` (the official NKI 0.6 top level)."""
from . import collectives, isa, language, typing  # noqa: F401
from .jit import jit, simulate  # noqa: F401

dtype = language.DType

__version__ = "0.6.0+sim"
_SIMULATED = True   # marker: this is kernels.sim's interpreter, not the real NKI package
