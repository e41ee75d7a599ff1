"""Run a function on several local processes joined by torch.distributed:
how tfk's multi-process tests and CPU benchmarks start their ranks.

Every rank runs ``fn(rank, world_size, *args)`` after
``init_process_group`` on a free local port; the call returns each rank's
result, in rank order. A rank that raises or exits fails the whole call with
that rank's traceback, and a rank that does not finish within ``timeout``
seconds (a hang in a collective) is killed and fails it too: the caller never
waits forever.
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
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, backend, threads, fn, args, results):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(threads)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure goes back to the caller
        results.put((rank, False, traceback.format_exc()))


class RankFailed(RuntimeError):
    """A rank raised, exited early, or ran past the timeout."""


def spawn(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo", threads: int = 1):
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each run
    in its own process (spawned: ``fn`` and ``args`` must be picklable, ``fn``
    defined at a module's top level) within a ``backend`` process group of
    ``world_size`` ranks, with ``threads`` torch threads each.

    Raises RankFailed, with the failing ranks' tracebacks, when a rank raises,
    dies, or has not finished ``timeout`` seconds after the start; every
    process is gone when it returns or raises.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, threads, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got, failures = {}, []
    try:
        while len(got) + len(failures) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got) - {r for r, _ in failures})
                failures.append((missing[0] if missing else -1,
                                 f"ranks {missing} did not finish within {timeout:.0f} s (killed)"))
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in got and r not in {f for f, _ in failures}]
                for r in dead:
                    failures.append((r, f"rank {r} exited with code {procs[r].exitcode} before reporting"))
                continue
            if ok:
                got[rank] = value
            else:
                failures.append((rank, value))
            if failures:
                # the others may now wait forever in a collective: give them a moment, then stop
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=0.5 if failures else 5.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise RankFailed("\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures)))
    return [got[r] for r in range(world_size)]
