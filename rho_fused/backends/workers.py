"""The chunked backend's CPU workers: one OpenMP thread each, handing out work items as they free up.

Each torch operator parallelises itself over ``torch.get_num_threads()`` OpenMP threads in equal
static shares, and ends at a barrier. A loop of thousands of short operators (a tile each) waits at
every barrier for its slowest thread: beside one busy process that thread is often descheduled,
and the loop ran 3.5x slower than idle (``bench/NOTES.md``). Here the same number of threads run
one operator each at a time, single-threaded, and take the next item when done: a thread that the
kernel deschedules only does fewer items. Items write disjoint outputs (or slots merged in item
order afterwards), so results do not depend on which thread ran what: they are bitwise those of
running the items in order on one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _single_threaded() -> None:
    # omp_set_num_threads (torch.set_num_threads) sets the calling thread's own count; torch also
    # keeps it as the default of threads started later, which the caller's count then restores.
    # torch sets a thread's count from that default on its first parallel use: do it first.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _get_pool(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="rho_fused", initializer=_single_threaded)
            _pool_size = threads
            # start every worker now (each waits for the others, so none is reused for a second
            # task), then give threads started later the caller's count again
            started = threading.Barrier(threads)
            for future in [_pool.submit(started.wait) for _ in range(threads)]:
                future.result()
            torch.set_num_threads(threads)
        return _pool


def _forget_pool() -> None:
    # a forked child has the pool's object but none of its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def threads_for(device: torch.device) -> int:
    """How many workers a call on ``device`` gets: ``torch.get_num_threads()`` on CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def run(item: Callable[[int], None], n_items: int, threads: int) -> None:
    """``item(0), ..., item(n_items - 1)`` on ``threads`` workers (in order, inline, for one).

    Items must write disjoint outputs. The first exception raised by an item is raised here,
    after every item has finished or failed.
    """
    if threads <= 1 or n_items <= 1:
        for k in range(n_items):
            item(k)
        return
    pool = _get_pool(threads)
    next_item = iter(range(n_items))
    take = threading.Lock()

    def drain() -> None:
        # grad mode is per thread: the caller's operator runs below autograd, a worker would record
        with torch.no_grad():
            while True:
                with take:
                    k = next(next_item, None)
                if k is None:
                    return
                item(k)

    futures = [pool.submit(drain) for _ in range(min(threads, n_items))]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
