"""The ``nki`` namespace of the interpreter: ``nki.jit``, ``nki.simulate``, ``nki.language``, ``nki.isa``."""
from . import isa, language  # noqa: F401
from .jit import jit, simulate, Kernel  # noqa: F401
from .tensor import NkiTensor as tensor  # noqa: F401

__version__ = "0.6.0+sim"
SIMULATED = True   # marker: this is kernels.sim's interpreter, not the real NKI package
