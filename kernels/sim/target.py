"""Target platform of the interpreter, read like the official ``NEURON_PLATFORM_TARGET_OVERRIDE``.

Values: ``trn1``/``gen2``/``inf2`` (NeuronCore-v2, the default here), ``trn2``/``gen3`` (v3), ``trn3``/``gen4`` (v4).
The variable is read at every kernel launch (``nki.jit`` call) and by :func:`set_target`; v2-only rules relax on v3+.
"""
import os

from .errors import ConstraintError

_NAMES = {"trn1": 2, "gen2": 2, "inf2": 2, "trn2": 3, "gen3": 3, "trn3": 4, "gen4": 4}
_version = 2


def parse(name):
    key = (name or "trn1").strip().lower()
    if key not in _NAMES:
        raise ValueError(f"NEURON_PLATFORM_TARGET_OVERRIDE={name!r} is not one of {sorted(_NAMES)}")
    return _NAMES[key]


def refresh():
    """Re-read NEURON_PLATFORM_TARGET_OVERRIDE (called at each kernel launch)."""
    global _version
    _version = parse(os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1"))
    return _version


def set_target(name):
    """Set the target explicitly (``"trn1"``, ``"trn2"``, ...) for code that calls nisa outside a launch."""
    global _version
    _version = parse(name)
    os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] = name
    return _version


def version():
    """NeuronCore generation: 2 (trn1), 3 (trn2), 4 (trn3)."""
    return _version


def require(min_version, instr, what="instruction"):
    if _version < min_version:
        raise ConstraintError(
            f"rule platform: {instr} {what} needs NeuronCore-v{min_version} or newer; the target is "
            f"NeuronCore-v{_version} (NEURON_PLATFORM_TARGET_OVERRIDE={os.environ.get('NEURON_PLATFORM_TARGET_OVERRIDE', 'trn1')})")


refresh()
