"""The run directory's exclusive lock: one ``train.py`` per ``--out-dir`` at a time.

``lock(out_dir)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<out-dir>/.lock`` and keeps the descriptor open
for the whole run (global rank 0 only; the other ranks of the same run write only inside checkpoint saves, which
rank 0 sequences). The kernel drops the lock when the process exits, however it exits (kill -9 included), so a
stale lock file never blocks a later run. The file records the holder (pid, host, start time) for the error a
second run gets. flock is advisory and per host: on NFS it is emulated by the server (Linux >= 2.6.12), as Slurm
jobs sharing one --out-dir on FSx/NFS need.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""


class RunDirLock:
    def __init__(self, out_dir: str, fd: int):
        self.out_dir, self.fd = out_dir, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)              # closing the descriptor drops the flock
            self.fd = None


def lock(out_dir: str) -> RunDirLock:
    """Hold ``out_dir`` exclusively (the directory must exist); RunDirBusy naming the holder if it is taken."""
    path = os.path.join(out_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirBusy(f"--out-dir {out_dir} is in use by another train.py ({holder}); wait for it to finish or "
                         f"choose another --out-dir (nothing was changed)") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
    return RunDirLock(out_dir, fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
