"""Events: subscription, payloads, filters, failing handlers, per-state delivery."""

from __future__ import annotations

import pytest

import mmsb
from conftest import new_state, run_workers

ET = mmsb.EventType


def _recorder():
    got: list[tuple] = []

    def handler(state, event_type, *data):
        got.append((state, event_type, data))

    return got, handler


def test_page_changed_payload(state) -> None:
    got, h = _recorder()
    sub = mmsb.subscribe(state, ET.PAGE_CHANGED, h)
    assert isinstance(sub, mmsb.Subscription)
    p = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"abcd")
    assert len(got) == 1
    st, et, data = got[0]
    assert st is state
    assert et == ET.PAGE_CHANGED
    assert data[0] == p.id
    assert data[1] == 1  # the new epoch
    assert data[2] == state.tlog[-1].id


def test_delta_applied_payload(state) -> None:
    got, h = _recorder()
    mmsb.subscribe(state, ET.DELTA_APPLIED, h)
    p = mmsb.create_page(state, 4)
    mmsb.write_page(state, p.id, 1, b"x")
    mmsb.write_page(state, p.id, 2, b"y")
    assert [g[2][:2] for g in got] == [(p.id, 1), (p.id, 2)]
    assert [g[2][3] for g in got] == [d.lsn for d in state.tlog]


def test_created_and_deleted(state) -> None:
    created, hc = _recorder()
    deleted, hd = _recorder()
    mmsb.subscribe(state, ET.PAGE_CREATED, hc)
    mmsb.subscribe(state, ET.PAGE_DELETED, hd)
    p = mmsb.create_page(state, 4)
    pages = mmsb.create_pages(state, 2, 4)
    mmsb.delete_page(state, p.id)
    assert [g[2][0] for g in created] == [p.id] + [q.id for q in pages]
    assert [g[2] for g in deleted] == [(p.id,)]


def test_no_event_for_unchanged_update_or_refusal(state) -> None:
    got, h = _recorder()
    p = mmsb.create_page(state, 4)
    mmsb.subscribe(state, ET.PAGE_CHANGED, h)
    mmsb.update_page(state, p.id, bytes(4))
    with pytest.raises(mmsb.InvalidDeltaError):
        mmsb.update_page(state, p.id, b"toolong")
    assert got == []
    # the subscription is live: the first real change is delivered, once
    mmsb.update_page(state, p.id, b"live")
    assert [g[2][:2] for g in got] == [(p.id, 1)]


def test_handler_sees_consistent_state(state) -> None:
    p = mmsb.create_page(state, 4)
    seen = []

    def h(st, et, *data):
        seen.append((mmsb.query_page(st, data[0]), st.pages[data[0]].epoch))

    mmsb.subscribe(state, ET.PAGE_CHANGED, h)
    mmsb.update_page(state, p.id, b"wxyz")
    assert seen == [(b"wxyz", 1)]


def test_unsubscribe(state) -> None:
    got, h = _recorder()
    sub = mmsb.subscribe(state, ET.PAGE_CHANGED, h)
    p = mmsb.create_page(state, 4)
    mmsb.write_page(state, p.id, 0, b"a")
    mmsb.unsubscribe(state, sub)
    mmsb.write_page(state, p.id, 0, b"b")
    assert len(got) == 1


def test_filter_by_page_id(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    c = mmsb.create_page(state, 4)
    only_b, hb = _recorder()
    b_or_c, hbc = _recorder()
    pred, hp = _recorder()
    mmsb.subscribe(state, ET.PAGE_CHANGED, hb, filter=b.id)
    mmsb.subscribe(state, ET.PAGE_CHANGED, hbc, filter=[b.id, c.id])
    mmsb.subscribe(state, ET.PAGE_CHANGED, hp, filter=lambda et, *data: data[1] >= 2)
    for pid in (a.id, b.id, c.id, b.id):
        mmsb.write_page(state, pid, state.pages[pid].epoch, b"!")
    assert [g[2][0] for g in only_b] == [b.id, b.id]
    assert [g[2][0] for g in b_or_c] == [b.id, c.id, b.id]
    assert [g[2][:2] for g in pred] == [(b.id, 2)]


@pytest.mark.filterwarnings("ignore")
def test_raising_handler_does_not_break_write(state) -> None:
    p = mmsb.create_page(state, 4)
    later, h_ok = _recorder()

    def bad(st, et, *data):
        raise RuntimeError("handler bug")

    mmsb.subscribe(state, ET.PAGE_CHANGED, bad)
    mmsb.subscribe(state, ET.PAGE_CHANGED, h_ok)
    before = mmsb.get_stats(state).handler_errors
    mmsb.update_page(state, p.id, b"safe")  # must not raise
    assert mmsb.query_page(state, p.id) == b"safe"
    assert p.epoch == 1
    assert mmsb.verify_state_consistency(state)
    assert mmsb.get_stats(state).handler_errors == before + 1
    mmsb.write_page(state, p.id, 0, b"S")
    assert mmsb.query_page(state, p.id) == b"Safe"
    assert len(later) == 2


def test_events_belong_to_one_state() -> None:
    s1, s2 = new_state(), new_state()
    got, h = _recorder()
    mmsb.subscribe(s1, ET.PAGE_CHANGED, h)
    mmsb.subscribe(s1, ET.PAGE_CREATED, h)
    p2 = mmsb.create_page(s2, 4)
    mmsb.update_page(s2, p2.id, b"abcd")
    assert got == []
    p1 = mmsb.create_page(s1, 4)
    mmsb.update_page(s1, p1.id, b"abcd")
    assert [g[1] for g in got] == [ET.PAGE_CREATED, ET.PAGE_CHANGED]
    assert all(g[0] is s1 for g in got)


def test_subscription_to_other_type_not_called(state) -> None:
    got, h = _recorder()
    mmsb.subscribe(state, ET.PAGE_DELETED, h)
    p = mmsb.create_page(state, 4)
    mmsb.update_page(state, p.id, b"abcd")
    assert got == []
    # ... and is called for its own type
    mmsb.delete_page(state, p.id)
    assert [(g[1], g[2]) for g in got] == [(ET.PAGE_DELETED, (p.id,))]


def test_handler_may_write_to_the_bus(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)

    def mirror(st, et, *data):
        if data[0] == a.id:
            mmsb.update_page(st, b.id, mmsb.query_page(st, a.id))

    mmsb.subscribe(state, ET.PAGE_CHANGED, mirror)
    mmsb.update_page(state, a.id, b"copy")
    assert mmsb.query_page(state, b.id) == b"copy"
    assert b.epoch == 1
    assert mmsb.verify_state_consistency(state)


def test_handler_from_other_threads_writes(state) -> None:
    import threading

    p = mmsb.create_page(state, 64)
    got: list[int] = []
    lock = threading.Lock()

    def h(st, et, *data):
        with lock:
            got.append(data[1])

    mmsb.subscribe(state, ET.PAGE_CHANGED, h)

    def worker(k: int) -> None:
        for i in range(50):
            mmsb.write_page(state, p.id, k * 8 + (i % 8), bytes([i + 1]))

    run_workers(worker, [(k,) for k in range(8)], timeout=60)
    assert sorted(got) == list(range(1, p.epoch + 1))
    assert p.epoch == 400


def test_structural_events_as_documented(state) -> None:
    got, h = _recorder()
    for et in ET:
        mmsb.subscribe(state, et, h)
    p = mmsb.create_page(state, 4)
    mmsb.resize_page(state, p.id, 8)
    mmsb.resize_page(state, p.id, 8)  # the same size does nothing
    mmsb.set_metadata(state, p.id, "k", 1)
    mmsb.set_metadata(state, p.id, "k", 1)  # unchanged metadata: no event
    mmsb.update_metadata(state, p.id, {"j": 2})
    c = mmsb.clone_page(state, p.id)
    mmsb.migrate_page(state, p.id, "cpu")  # already there: nothing to tell
    mmsb.delete_page(state, c.id)
    assert [(g[1], g[2]) for g in got] == [
        (ET.PAGE_CREATED, (p.id,)),
        (ET.PAGE_RESIZED, (p.id, 4, 8)),
        (ET.METADATA_CHANGED, (p.id,)),
        (ET.METADATA_CHANGED, (p.id,)),
        (ET.PAGE_CREATED, (c.id,)),
        (ET.PAGE_DELETED, (c.id,)),
    ]
