"""Seeded multi-thread stress: concurrent create / resize / delete / write keep the page
table, the arena and the log consistent."""

from __future__ import annotations

import random
import threading

import pytest

import mmsb
from conftest import Workers, new_state, page_ids, run_workers

N_THREADS = 8
OPS = 250


def _check(state) -> None:
    check = getattr(state, "_check", None)
    assert callable(check), "MMSBState._check() is promised by the implementation"
    check()


def test_concurrent_mixed_operations() -> None:
    s = new_state()
    shared = [p.id for p in mmsb.create_pages(s, 4, 64)]
    barrier = threading.Barrier(N_THREADS)
    models: list[dict[int, bytearray]] = [dict() for _ in range(N_THREADS)]
    created: list[list[int]] = [[] for _ in range(N_THREADS)]

    def worker(k: int) -> None:
        rng = random.Random(1000 + k)
        mine = models[k]
        barrier.wait()
        for _ in range(OPS):
            op = rng.random()
            if op < 0.15 or not mine:
                if rng.random() < 0.3:
                    pages = mmsb.create_pages(s, rng.randint(1, 4), rng.randint(1, 128))
                else:
                    pages = [mmsb.create_page(s, rng.randint(1, 128))]
                for p in pages:
                    mine[p.id] = bytearray(p.size)
                    created[k].append(p.id)
            elif op < 0.25:
                pid = rng.choice(list(mine))
                new_size = rng.randint(1, 256)
                mmsb.resize_page(s, pid, new_size)
                buf = mine[pid]
                if new_size <= len(buf):
                    del buf[new_size:]
                else:
                    buf.extend(bytes(new_size - len(buf)))
            elif op < 0.33:
                pid = rng.choice(list(mine))
                mmsb.delete_page(s, pid)
                del mine[pid]
            elif op < 0.55:
                pid = rng.choice(shared)
                off = rng.randrange(64)
                mmsb.write_page(s, pid, off, bytes([rng.randrange(256)]) * min(4, 64 - off))
            else:
                pid = rng.choice(list(mine))
                buf = mine[pid]
                off = rng.randrange(len(buf))
                n = rng.randint(1, len(buf) - off)
                data = bytes(rng.randrange(256) for _ in range(n))
                if rng.random() < 0.5:
                    mmsb.write_page(s, pid, off, data)
                    buf[off:off + n] = data
                else:
                    full = bytearray(buf)
                    full[off:off + n] = data
                    mmsb.update_page(s, pid, bytes(full))
                    buf[:] = full
                assert mmsb.query_page(s, pid) == bytes(buf)

    run_workers(worker, [(k,) for k in range(N_THREADS)])

    _check(s)
    all_created = [pid for ids in created for pid in ids]
    assert len(all_created) == len(set(all_created)), "a page id was handed out twice"
    assert not set(all_created) & set(shared)
    live_expected = set(shared) | {pid for m in models for pid in m}
    assert set(page_ids(s)) == live_expected
    for m in models:
        for pid, buf in m.items():
            assert mmsb.query_page(s, pid) == bytes(buf)
            assert s.pages[pid].size == len(buf)
    lsns = [d.lsn for d in s.tlog]
    assert lsns == sorted(lsns) and len(lsns) == len(set(lsns))
    assert mmsb.verify_state_consistency(s)
    r = mmsb.replay_to_lsn(s, s.last_lsn)
    assert {pid: mmsb.query_page(r, pid) for pid in page_ids(r)} == {
        pid: mmsb.query_page(s, pid) for pid in page_ids(s)
    }


def test_concurrent_conflicting_deltas_exactly_one_wins() -> None:
    s = new_state()
    p = mmsb.create_page(s, 8)
    n = N_THREADS
    deltas = [mmsb.create_delta(s, p.id, [i == k for i in range(8)], bytes([k + 1]) * 8)
              for k in range(n)]
    barrier = threading.Barrier(n)
    outcome: list[str] = [""] * n

    def worker(k: int) -> None:
        barrier.wait()
        try:
            mmsb.route_delta(s, deltas[k])
            outcome[k] = "ok"
        except mmsb.InvalidDeltaError:
            outcome[k] = "conflict"
        # any other exception fails the test through run_workers

    run_workers(worker, [(k,) for k in range(n)], timeout=60)
    assert sorted(outcome) == ["conflict"] * (n - 1) + ["ok"]
    assert p.epoch == 1
    winner = outcome.index("ok")
    expect = bytearray(8)
    expect[winner] = winner + 1
    assert mmsb.query_page(s, p.id) == bytes(expect)
    assert len(s.tlog) == 1
    _check(s)


@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_create_ids_unique(seed) -> None:
    s = new_state()
    barrier = threading.Barrier(N_THREADS)
    got: list[list[int]] = [[] for _ in range(N_THREADS)]

    def worker(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        barrier.wait()
        for _ in range(100):
            if rng.random() < 0.5:
                got[k].append(mmsb.create_page(s, rng.randint(1, 64)).id)
            else:
                got[k].extend(p.id for p in mmsb.create_pages(s, 3, 16))

    run_workers(worker, [(k,) for k in range(N_THREADS)], timeout=60)
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == list(range(1, len(ids) + 1))
    for g in got:
        assert g == sorted(g)  # each thread sees increasing ids
    _check(s)
    assert mmsb.verify_state_consistency(s)


def test_every_worker_failure_fails_the_caller() -> None:
    # the harness the tests above rely on: no exception raised in a thread is lost
    def worker(k: int) -> None:
        if k % 2:
            raise ValueError(f"worker {k}")

    with pytest.raises(BaseExceptionGroup) as info:
        run_workers(worker, [(k,) for k in range(6)], timeout=10)
    assert sorted(str(e) for e in info.value.exceptions) == ["worker 1", "worker 3", "worker 5"]
    run_workers(lambda k: None, [(k,) for k in range(3)], timeout=10)  # no failure, no raise


def test_a_hung_worker_fails_the_caller() -> None:
    release = threading.Event()
    workers = Workers(lambda: release.wait(30), [()])
    try:
        with pytest.raises(AssertionError, match="still running"):
            workers.join(timeout=0.05)
    finally:
        release.set()
    workers.join(timeout=30)
