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


def run_blocks(
    compute: Callable[[int, int], None],
    commit: Callable[[int, int, int], None],
    n_blocks: int,
    n_stripes: int,
    n_buffers: int,
    threads: int,
) -> None:
    """``compute(b, buffer)`` for every block ``b``, then ``commit(b, s, buffer)`` for each stripe ``s``.

    A block is computed into one of ``n_buffers`` buffers, by any worker, in any order; its commits
    into stripe ``s`` (a sum over blocks) run in block order, one at a time per stripe, so each
    stripe's sum is added up in the same order whoever runs it. The buffer is free again once every
    stripe has the block. Workers commit first, compute when a buffer is free, else wait. One
    thread: block by block, in order.
    """
    if threads <= 1 or n_blocks <= 1:
        for b in range(n_blocks):
            compute(b, 0)
            for s in range(n_stripes):
                commit(b, s, 0)
        return
    pool = _get_pool(threads)
    state = threading.Condition()
    free = list(range(n_buffers))
    buffer_of: dict[int, int] = {}
    ready: set[int] = set()
    next_block, next_commit, busy = [0], [0] * n_stripes, [False] * n_stripes
    left = [n_stripes] * n_blocks
    failed: list[BaseException] = []

    def take() -> tuple | None:
        """The next job, under ``state``: a commit that may run, else a block to compute, else None."""
        for s in range(n_stripes):
            b = next_commit[s]
            if b < n_blocks and not busy[s] and b in ready:
                busy[s] = True
                return commit, b, s, buffer_of[b]
        if next_block[0] < n_blocks and free:
            b = next_block[0]
            next_block[0] += 1
            buffer_of[b] = free.pop()
            return compute, b, buffer_of[b]
        return None

    def done(job: tuple) -> None:
        if job[0] is compute:
            b = job[1]
            ready.add(b)
        else:
            b, s = job[1], job[2]
            busy[s] = False
            next_commit[s] += 1
            left[b] -= 1
        if not left[b]:  # every stripe has the block (at once, with no stripes)
            free.append(buffer_of.pop(b))

    def work() -> None:
        with torch.no_grad():
            while True:
                with state:
                    while True:
                        if failed or (len(ready) == n_blocks and all(c == n_blocks for c in next_commit)):
                            return
                        job = take()
                        if job is not None:
                            break
                        state.wait()
                try:
                    job[0](*job[1:])
                except BaseException as error:
                    with state:
                        failed.append(error)
                        state.notify_all()
                    raise
                with state:
                    done(job)
                    state.notify_all()

    futures = [pool.submit(work) for _ in range(threads)]
    for future in futures:
        future.exception()
    if failed:
        raise failed[0]
