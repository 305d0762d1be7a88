"""Sharded, atomic, resumable checkpoints.

Layout: ``<out-dir>/checkpoints/step_000123/`` holding one ``rank_tp{t}_dp{d}.pt`` per rank (model, optimizer,
scheduler, data position, RNG states, NaN-guard counters, SR seed info) and ``meta.json`` (config identity and
its hash, world layout, step, precision, the list of rank files with their sizes).

Integrity: each rank hashes its file (sha256, computed while it is written) into a ``<file>.sha256`` sidecar;
rank 0 collects them into meta.json's ``sha256`` map. ``load`` re-hashes the rank file and refuses a mismatch
(flipped bytes of the same size), naming the file; ``newest_intact`` finds the newest checkpoint whose every
file matches, for ``--resume`` to name in its error and to fall back to when told (``--resume-fallback``).
Checkpoints written before checksums existed load with the size check only.

Atomicity: everything is written into ``step_000123.tmp-<pid>/`` (pid of global rank 0); each rank writes its
file, fsyncs it, then a barrier; rank 0 writes ``meta.json`` last (fsync), renames the directory to its final
name (``os.rename``, atomic on POSIX within a filesystem) and fsyncs the parent. A checkpoint is *complete* when
its final directory exists and its meta.json parses and lists files that exist with the recorded sizes; a crash
at any moment leaves either the previous complete checkpoints or a ``*.tmp-*`` directory that is never read (and
is removed by the next save). Old checkpoints beyond ``keep_last`` are deleted only after the new one is complete,
by renaming them to ``*.old-*`` first: a kill during the deletion never leaves a half-deleted ``step_N``.
Multi-node runs need ``--out-dir`` on a filesystem every node sees (FSx / NFS), as NeMo and NxD do.

Test hook (used by tests/test_train_resume.py to land a SIGKILL inside a save): environment variable
``LLAMA_TRAIN_CKPT_SLEEP=[STEP:]SECONDS`` makes the save (of that step only, with STEP) sleep after the rank files are written and before meta.json
and the rename, after printing ``checkpoint-write-in-progress`` on stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

from llama.data.indexed import owner_gone      # the *.tmp-<pid> rule the data pipeline uses too
from llama.data.tokenizer import sha256_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or from another configuration; names the path."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rank_file(tp_rank: int, dp_rank: int, pp_rank: int = 0) -> str:
    """The rank's file name; pipeline stages after the first add ``_pp{p}`` (PP 1 keeps the original names)."""
    return f"rank_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.pt" if pp_rank else f"rank_tp{tp_rank}_dp{dp_rank}.pt"


def _barrier():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast_str(s: str | None) -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [s]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return s


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of final-named checkpoint directories, oldest first (temporaries are ignored)."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def read_meta(path: str) -> dict:
    """meta.json of a final checkpoint directory, validated against the files present (CheckpointError if not)."""
    mpath = os.path.join(path, "meta.json")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path} is incomplete: no meta.json")
    try:
        with open(mpath) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is corrupt ({e})") from None
    if meta.get("format") != FORMAT_VERSION or not meta.get("complete"):
        raise CheckpointError(f"checkpoint {path}: meta.json has format {meta.get('format')!r} / complete "
                              f"{meta.get('complete')!r}; expected format {FORMAT_VERSION}, complete true")
    for name, size in meta.get("files", {}).items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"checkpoint {path}: rank file {name} listed in meta.json is missing")
        if os.path.getsize(f) != size:
            raise CheckpointError(f"checkpoint {path}: rank file {name} has {os.path.getsize(f)} bytes, meta.json "
                                  f"records {size} (truncated or overwritten)")
    return meta


def latest_checkpoint(out_dir: str) -> str:
    """The newest final checkpoint; CheckpointError when there is none or when it does not validate."""
    found = list_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoint_root(out_dir)} (nothing to resume; run "
                              f"without --resume to start, or point --out-dir at the run to continue)")
    step, path = found[-1]
    read_meta(path)
    return path


def diff_identity(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys
            if json.dumps(saved.get(k), sort_keys=True, default=str) != json.dumps(current.get(k), sort_keys=True,
                                                                                   default=str)]


def save(out_dir: str, step: int, state: dict, meta: dict, tp_rank: int, dp_rank: int, keep_last: int,
         pp_rank: int = 0) -> str:
    """Collective: every rank calls it with its own ``state``; returns the final directory."""
    root = checkpoint_root(out_dir)
    final = os.path.join(root, f"step_{step:06d}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = None
    if rank0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):          # leftovers of killed saves: never complete, safe to drop
            if (".tmp-" in name or ".old-" in name) and owner_gone(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        tmp = os.path.join(root, f"step_{step:06d}.tmp-{os.getpid()}")
        os.makedirs(tmp)
    tmp = _broadcast_str(tmp)
    name = rank_file(tp_rank, dp_rank, pp_rank)
    fpath = os.path.join(tmp, name)
    with open(fpath, "wb") as fh:
        hashing = _HashingWriter(fh)
        torch.save(state, hashing)
        fh.flush()
        os.fsync(fh.fileno())
    with open(fpath + ".sha256", "w") as fh:
        fh.write(hashing.hexdigest())
        fh.flush()
        os.fsync(fh.fileno())
    _barrier()
    if rank0:
        hook = os.environ.get("LLAMA_TRAIN_CKPT_SLEEP", "")
        at, _, secs = hook.rpartition(":")
        delay = float(secs) if secs and (not at or int(at) == step) else 0.0
        if delay:
            print("checkpoint-write-in-progress", file=sys.stderr, flush=True)
            time.sleep(delay)
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f.endswith(".pt")}
        sums = {}
        for f in files:
            with open(os.path.join(tmp, f + ".sha256")) as fh:
                sums[f] = fh.read().strip()
            os.remove(os.path.join(tmp, f + ".sha256"))
        meta = dict(meta, format=FORMAT_VERSION, complete=True, step=step, files=files, sha256=sums)
        mtmp = os.path.join(tmp, "meta.json")
        with open(mtmp, "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):              # a step saved twice (e.g. resumed at it): replace atomically
            old = final + f".old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        for _, path in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            _remove_final(path)
    _barrier()
    return final


def _remove_final(path: str) -> None:
    """Delete a complete checkpoint without ever exposing a half-deleted one under its final name: rename it out
    of the ``step_N`` namespace first (atomic), then delete. A kill inside the deletion leaves an ``.old-``
    directory, which is never read and is removed by the next save."""
    doomed = f"{path}.old-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load(path: str, tp_rank: int, dp_rank: int, pp_rank: int = 0) -> dict:
    """This rank's state from checkpoint ``path``, after checking the file's sha256 against meta.json."""
    f = os.path.join(path, rank_file(tp_rank, dp_rank, pp_rank))
    if not os.path.isfile(f):
        raise CheckpointError(f"checkpoint {path} has no file for tp rank {tp_rank}, pp rank {pp_rank}, dp rank "
                              f"{dp_rank} ({f})")
    verify_file(path, os.path.basename(f), read_meta(path))
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:                     # torch raises several types for truncated / garbage files
        raise CheckpointError(f"checkpoint file {f} is corrupt and cannot be read: {type(e).__name__}: {e}") from None


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save's zip writer needs write/flush)."""

    def __init__(self, fh):
        self.fh, self.h = fh, hashlib.sha256()

    def write(self, b):
        self.h.update(b)
        return self.fh.write(b)

    def flush(self):
        self.fh.flush()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def verify_file(path: str, name: str, meta: dict) -> None:
    """CheckpointError unless the rank file ``name`` of checkpoint ``path`` has the sha256 meta.json records
    (checkpoints from before checksums record none: nothing to check)."""
    want = (meta.get("sha256") or {}).get(name)
    if want is None:
        return
    got = sha256_file(os.path.join(path, name))
    if got != want:
        raise CheckpointError(f"checkpoint file {os.path.join(path, name)} is corrupt: its sha256 {got[:16]}... "
                              f"differs from {want[:16]}... recorded in meta.json (changed bytes)")


def verify(path: str) -> dict:
    """meta.json of checkpoint ``path`` after checking every rank file's size and sha256 (CheckpointError)."""
    meta = read_meta(path)
    for name in meta.get("files", {}):
        verify_file(path, name, meta)
    return meta


def newest_intact(out_dir: str) -> str | None:
    """The newest checkpoint whose files all pass ``verify``, or None."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            verify(path)
            return path
        except CheckpointError:
            continue
    return None
