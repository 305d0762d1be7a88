"""Run a function in N local processes joined by a gloo process group (the multi-process TP tests).

``run_distributed(fn, world_size, *args)`` spawns world_size processes (start method "spawn"), each calling
``fn(rank, world_size, *args)`` after ``init_process_group("gloo")`` on a free localhost port with one
intra-op thread; it returns the list of return values ordered by rank. A worker exception is re-raised in
the caller with the worker's traceback; a worker that dies without reporting fails the call at once.
``fn`` must be a module-level (picklable) function.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 170.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size and not errors:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:    # died before reporting (killed, or failed while unpickling fn)
                    errors.append(f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: no result from some of {world_size} workers within "
                                       f"{timeout}s (got ranks {sorted(out)})") from None
                continue
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=1 if errors else 10)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
