"""``nl.NKIObject``: the base class of NKI configuration objects.

The NKI language guide allows NKIObject subclasses inside kernels as dataclass-like values: AWS's library subclasses
it with un-annotated class attributes as defaults and builds instances from keyword arguments
(``Cfg(tile=128)``). ``NKIObject(**kwargs)`` sets each keyword as an attribute; unknown keywords are allowed
(the official ``__init__(self, **kwargs)`` takes any). Subclasses that define their own ``__init__`` or are
``@dataclass`` keep working because this ``__init__`` is only the default.
"""
import enum as _enum


class NKIObject:
    """Base class for NKI kernel dataclasses and configuration objects."""

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class MemoryRegion(_enum.Enum):
    """``nl.MemoryRegion``: memory region constants for NKI tensors (``nl.hbm`` is an alias of ``private_hbm``)."""
    sbuf = "sbuf"
    psum = "psum"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"


# storage buffer name -> region (kernel arguments live in "hbm": the device HBM a caller passed in)
REGION_OF = {"sbuf": MemoryRegion.sbuf, "psum": MemoryRegion.psum, "hbm": MemoryRegion.private_hbm,
             "private_hbm": MemoryRegion.private_hbm, "shared_hbm": MemoryRegion.shared_hbm}
