"""The chunked backend's CPU workers: items on single-threaded workers, results independent of who ran what."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from cases import make_case

import rho_fused
from rho_fused.backends import chunked, workers


def test_run_covers_every_item_once_on_workers():
    seen: list[tuple[int, str, int, bool]] = []
    lock = threading.Lock()

    def item(k: int) -> None:
        with lock:
            seen.append((k, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))

    workers.run(item, 37, 2)
    assert sorted(k for k, *_ in seen) == list(range(37))
    assert all(name.startswith("rho_fused") and threads == 1 and not grad for _, name, threads, grad in seen)
    inline: list[str] = []
    workers.run(lambda k: inline.append(threading.current_thread().name), 3, 1)
    assert inline == [threading.current_thread().name] * 3


def test_run_raises_an_items_error_after_the_others_finish():
    done: list[int] = []

    def item(k: int) -> None:
        if k == 3:
            raise ValueError("item 3")
        done.append(k)

    with pytest.raises(ValueError, match="item 3"):
        workers.run(item, 10, 2)
    assert sorted(done) == [k for k in range(10) if k != 3]


def test_callers_thread_count_kept(monkeypatch):
    before = torch.get_num_threads()
    workers.run(lambda k: None, 4, 2)
    assert torch.get_num_threads() == before
    counts: list[int] = []
    t = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert counts == [before]  # a thread started later gets the process's count, not the workers' 1


def _loss_and_grads(keep_ratio: float) -> list[torch.Tensor]:
    case = make_case((6, 50), 48, 700, seed=4, bias=True, ref="random")
    h, w, b = (t.detach().clone().requires_grad_() for t in (case.hidden, case.weight, case.bias))
    reduction = "none" if keep_ratio < 1 else "mean"
    loss = rho_fused.fused_selective_loss(h, w, case.targets, case.ref_loss, bias=b, keep_ratio=keep_ratio,
                                          reduction=reduction, backend="chunked")  # fmt: skip
    loss.backward(case.upstream if keep_ratio < 1 else None)
    return [loss.detach(), h.grad, w.grad, b.grad]


@pytest.mark.parametrize("keep_ratio", [0.6, 1.0])
def test_workers_give_bitwise_the_inline_result(monkeypatch, keep_ratio):
    """Two workers taking tiles (and for plain CE, blocks of rows and their stripes of d W) in
    whatever order, against the same items in order on this thread."""
    monkeypatch.setattr(chunked, "MIN_TILE_COLS", 16)
    monkeypatch.setattr(chunked, "FORWARD_BUDGET_BYTES", 64 * 96 * 4 * 2 * 2)
    monkeypatch.setattr(chunked, "BACKWARD_BUDGET_BYTES", 60 * 48 * 4 * 20)
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_BYTES", 40 * 700 * 4 * 3)  # blocks of 40 rows
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_OF_DW", 0.0)
    monkeypatch.setattr(chunked, "MIN_SINGLE_PASS_ROWS", 8)
    monkeypatch.setattr(workers, "threads_for", lambda device: 2)
    pooled = [_loss_and_grads(keep_ratio) for _ in range(3)]
    real_run, real_blocks = workers.run, workers.run_blocks
    monkeypatch.setattr(workers, "run", lambda item, n, threads: real_run(item, n, 1))
    monkeypatch.setattr(workers, "run_blocks", lambda *args: real_blocks(*args[:-1], 1))
    alone = _loss_and_grads(keep_ratio)
    for got in pooled:
        assert all(torch.equal(a, b) for a, b in zip(got, alone, strict=True))


def test_run_blocks_commits_each_stripe_in_block_order():
    import random
    import time

    log: list[tuple] = []
    lock = threading.Lock()

    def compute(b: int, buffer: int) -> None:
        time.sleep(random.random() * 0.002)
        with lock:
            log.append(("compute", b, buffer))

    def commit(b: int, s: int, buffer: int) -> None:
        time.sleep(random.random() * 0.001)
        with lock:
            log.append(("commit", b, s, buffer))

    workers.run_blocks(compute, commit, 11, 4, 3, 2)
    assert sorted(e[1] for e in log if e[0] == "compute") == list(range(11))
    for s in range(4):
        assert [e[1] for e in log if e[0] == "commit" and e[2] == s] == list(range(11))
    pending: dict[int, int] = {}  # buffer -> commits its block still awaits
    for e in log:  # in the order they finished: a buffer is reused only once every stripe has its block
        if e[0] == "compute":
            assert not pending.get(e[2]), f"buffer {e[2]} reused while its block awaits commits"
            pending[e[2]] = 4
        else:
            assert e[3] == next(c[2] for c in log if c[0] == "compute" and c[1] == e[1])
            pending[e[3]] -= 1
    assert set(pending) <= {0, 1, 2} and not any(pending.values())


def test_run_blocks_without_stripes_computes_every_block():
    computed: list[int] = []
    workers.run_blocks(lambda b, buffer: computed.append(b), lambda *_: None, 5, 0, 3, 2)
    assert sorted(computed) == list(range(5))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_forked_child_starts_its_own_workers():
    workers.run(lambda k: None, 4, 2)  # the parent's pool exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a pool object without threads would hang here
        try:
            out: list[int] = []
            workers.run(out.append, 8, 2)
            os.write(write, b"ok" if sorted(out) == list(range(8)) else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 8) == b"ok" and status == 0
