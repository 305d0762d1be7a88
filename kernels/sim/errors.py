"""Errors raised by the NKI interpreter.

Every trn1 rule violation raises :class:`ConstraintError` with the message format
``rule <name>: <instruction> operand '<role>' <what> (limit <x>)`` so that a failing kernel says which rule,
which instruction and which operand broke it.
"""


class ConstraintError(ValueError):
    """A NeuronCore rule (shape, buffer, dtype, engine, platform) was broken by an instruction."""


class CapacityError(ConstraintError):
    """Live SBUF or PSUM bytes per partition exceeded the chip's capacity."""
