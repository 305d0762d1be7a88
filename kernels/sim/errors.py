"""Errors raised by the NKI interpreter.

Every trn1 rule violation raises :class:`ConstraintError` with the message format
``rule <name>: <instruction> operand '<role>' <what> (limit <x>)`` so that a failing kernel says which rule,
which instruction and which operand broke it.
"""


class NkiValidationError(Exception):
    """``nisa.NkiValidationError``: raised when hardware constraints are violated (official name)."""


class ConstraintError(NkiValidationError, ValueError):
    """A NeuronCore rule (shape, buffer, dtype, engine, platform) was broken by an instruction."""


class CapacityError(ConstraintError):
    """Live SBUF or PSUM bytes per partition exceeded the chip's capacity."""


class LanguageError(ConstraintError):
    """The kernel does something the NKI compiler's Python subset does not allow (NKI language guide): numpy/torch
    called on a tensor, an on-chip value read into Python, Python control flow on tensor values."""
