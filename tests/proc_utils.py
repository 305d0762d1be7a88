"""Subprocess helpers for the tests that interrupt a child with Ctrl-C (SIGINT).

A shell that starts a job in the background without job control (``cmd &`` in a script, as CI harnesses may do)
starts it with SIGINT ignored, and children inherit that: Python then never installs its KeyboardInterrupt
handler and a SIGINT sent by the test is silently dropped. ``INTERRUPTIBLE`` restores the default disposition in
the child before it execs, so the tests exercise the programs' own Ctrl-C handling whatever started pytest.
"""
import signal


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INTERRUPTIBLE = dict(preexec_fn=_default_sigint)
