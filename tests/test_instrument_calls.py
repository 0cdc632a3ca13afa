"""Call hooks: calls of instrumented functions land in bounded per-thread ring pages
(function, depth, start, duration, sequence); other code is not recorded; refusals
install nothing."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from typing import Any

import pytest

import mmsb
from instrument_helpers import make_state
from mmsb._instrument.calls import (
    MONITORING,
    RING_MAGIC,
    decode_ring,
    hook_installed,
    ring_pages,
)
from mmsb._instrument.ir import code_of
from mmsb._instrument.manager import manager_of

state_fixture = pytest.fixture(name="state")(make_state)


def leaf(x: int) -> int:
    return x * 2


def outer(n: int) -> int:
    return sum(leaf(i) for i in range(n))


def gen(n: int) -> Any:
    yield from range(n)


def boom() -> None:
    raise ValueError("boom")


def not_instrumented(x: int) -> int:
    return x


LEAF_CODE = leaf.__code__
NOT_INSTRUMENTED_CODE = not_instrumented.__code__


def _enable(st: mmsb.MMSBState, **kw: Any) -> None:
    fns = kw.pop("functions", (leaf, outer, gen, boom))
    mmsb.enable_instrumentation(st, mmsb.InstrumentationConfig(functions=fns, calls=True,
                                                              **kw))


def test_calls_are_recorded_in_the_threads_ring_page(state: mmsb.MMSBState) -> None:
    _enable(state)
    assert outer(3) == 6
    not_instrumented(1)
    assert mmsb.flush_call_events(state) == 4
    events = mmsb.call_events(state)
    names = [e.name.split(":")[1] for e in events]
    assert names == ["leaf", "leaf", "leaf", "outer"]  # in order of return
    assert [e.depth for e in events] == [1, 1, 1, 0]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    outer_ev = events[-1]
    assert outer_ev.function_page == mmsb.code_pages(state, outer)["ir"]
    assert all(e.duration_ns >= 0 for e in events)
    assert outer_ev.duration_ns >= max(e.duration_ns for e in events[:3])
    assert {e.thread_id for e in events} == {threading.get_native_id()}
    assert mmsb.call_events(state, thread_id=threading.get_native_id()) == events
    rings = ring_pages(state)
    assert list(rings.values()) == [threading.get_native_id()]
    pid = next(iter(rings))
    assert {e.ring_page for e in events} == {pid}
    assert mmsb.query_page(state, pid)[:8] == RING_MAGIC
    assert mmsb.get_deltas_for_page(state, pid)[-1].source == "calls"
    assert mmsb.verify_state_consistency(state)


def test_generators_and_exceptions(state: mmsb.MMSBState) -> None:
    _enable(state)
    assert list(gen(2)) == [0, 1]
    with pytest.raises(ValueError):
        boom()
    mmsb.flush_call_events(state)
    names = [e.name.split(":")[1] for e in mmsb.call_events(state)]
    # A generator is entered at each resume and left at each yield and at its end.
    assert names.count("gen") == 3
    assert names[-1] == "boom"


def test_the_ring_keeps_the_newest_records(state: mmsb.MMSBState) -> None:
    _enable(state, ring_capacity=8, flush_every=5)
    for i in range(23):
        leaf(i)
    mmsb.flush_call_events(state)
    events = mmsb.call_events(state)
    assert [e.seq for e in events] == list(range(15, 23))
    (pid,) = ring_pages(state)
    tid, total, recs = decode_ring(mmsb.query_page(state, pid))
    assert total == 23 and len(recs) == 8
    # Written as it went: flushes at 5, 10, 15 and 20 records, then the last three.
    assert len(mmsb.get_deltas_for_page(state, pid)) >= 5


def test_records_past_the_buffer_bound_are_counted_lost(state: mmsb.MMSBState) -> None:
    _enable(state, ring_capacity=4, flush_every=1000)
    for i in range(10):
        leaf(i)
    mmsb.flush_call_events(state)
    events = mmsb.call_events(state)
    assert [e.seq for e in events] == [6, 7, 8, 9]
    mgr = manager_of(state)
    assert mgr is not None and mgr.calls is not None and mgr.calls.dropped == 6


def test_sampling(state: mmsb.MMSBState) -> None:
    _enable(state, call_sample_every=3)
    for i in range(9):
        leaf(i)
    mmsb.flush_call_events(state)
    assert len(mmsb.call_events(state)) == 3


def test_threads_started_later_get_their_own_ring(state: mmsb.MMSBState) -> None:
    _enable(state)
    ids: list[int] = []

    def work() -> None:
        ids.append(threading.get_native_id())
        for i in range(5):
            leaf(i)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    leaf(1)
    mmsb.flush_call_events(state)
    rings = ring_pages(state)
    assert len(rings) == 2 and set(rings.values()) <= {ids[0], threading.get_native_id()}
    counts = sorted(sum(1 for e in mmsb.call_events(state) if e.ring_page == p) for p in rings)
    assert counts == [1, 5]


def test_ended_threads_are_let_go(state: mmsb.MMSBState) -> None:
    # Nothing is installed per thread; the recorder drops a thread's buffer once the
    # thread has ended and its records are written, so short threads do not pile up.
    _enable(state)
    mgr = manager_of(state)
    assert mgr is not None and mgr.calls is not None
    for _ in range(20):
        t = threading.Thread(target=leaf, args=(1,))
        t.start()
        t.join()
    mmsb.flush_call_events(state)
    assert sum(1 for e in mmsb.call_events(state) if e.name.endswith("leaf")) == 20
    assert len(mgr.calls.threads) <= 1
    assert len(ring_pages(state)) == 20


def test_no_flush_inside_a_batch(state: mmsb.MMSBState) -> None:
    _enable(state, flush_every=1)
    page = mmsb.create_page(state, 8)
    with mmsb.batch(state):
        mmsb.write_page(state, page.id, 0, b"x")
        leaf(1)  # the opportunistic flush waits
        with pytest.raises(mmsb.InvalidArgumentError, match="inside a batch"):
            mmsb.flush_call_events(state)
    assert ring_pages(state) == {}
    assert mmsb.flush_call_events(state) == 1


def test_disable_flushes_and_uninstalls(state: mmsb.MMSBState) -> None:
    _enable(state)
    leaf(1)
    assert hook_installed()
    mmsb.disable_instrumentation(state)
    assert not hook_installed() and sys.getprofile() is None
    assert len(mmsb.call_events(state)) == 1
    leaf(2)
    assert len(mmsb.call_events(state)) == 1


def test_a_foreign_profiler_stays_and_both_see_the_calls(state: mmsb.MMSBState) -> None:
    seen: list[str] = []

    def theirs(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.append(frame.f_code.co_name)

    sys.setprofile(theirs)
    try:
        _enable(state)
        leaf(1)
        assert sys.getprofile() is theirs
    finally:
        sys.setprofile(None)
    assert "leaf" in seen
    assert mmsb.flush_call_events(state) == 1


def test_only_one_state_records_calls(state: mmsb.MMSBState) -> None:
    _enable(state)
    other = mmsb.MMSBState()
    with pytest.raises(mmsb.InvalidArgumentError, match="another state"):
        _enable(other)
    assert manager_of(other) is None and len(other.pages) == 0
    mmsb.disable_instrumentation(state)
    _enable(other)
    mmsb.disable_instrumentation(other)


def test_calls_option_switched_by_configure(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(leaf,)))
    assert not hook_installed()
    mmsb.configure_instrumentation(state, calls=True)
    assert hook_installed()
    leaf(1)
    mmsb.configure_instrumentation(state, calls=False)
    assert not hook_installed()
    assert len(mmsb.call_events(state)) == 1


def test_recaptured_code_is_recorded_too(state: mmsb.MMSBState) -> None:
    def target(x: int) -> int:
        return x

    def replacement(x: int) -> int:
        return x + 1

    _enable(state, functions=(target,))
    target(1)
    target.__code__ = replacement.__code__
    mmsb.refresh_code(state)
    target(1)
    mmsb.flush_call_events(state)
    assert len(mmsb.call_events(state)) == 2


def test_ring_decoder_refuses_damage() -> None:
    with pytest.raises(mmsb.SerializationError):
        decode_ring(b"short")
    with pytest.raises(mmsb.SerializationError):
        decode_ring(b"NOTARING" + bytes(24 + 32))
    good = RING_MAGIC + bytes([1, 0, 32, 0, 2, 0, 0, 0]) + bytes(16)
    with pytest.raises(mmsb.SerializationError):
        decode_ring(good + bytes(32))  # says two records, holds one
    assert len(decode_ring(bytes(32 + 64))[2]) == 0  # created, never flushed


def test_the_hook_in_use_matches_the_interpreter(state: mmsb.MMSBState) -> None:
    """sys.monitoring from 3.12 on (only the instrumented code objects report events);
    trampolines in the instrumented functions before."""
    _enable(state)
    if sys.version_info >= (3, 12):
        assert MONITORING and sys.getprofile() is None
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        tool = next(i for i in range(6) if mon.get_tool(i) == "mmsb")
        assert mon.get_local_events(tool, leaf.__code__) != 0
        assert mon.get_local_events(tool, not_instrumented.__code__) == 0
    else:
        # Trampolines in the instrumented functions only; no profile function anywhere.
        assert not MONITORING and sys.getprofile() is None and threading.getprofile() is None
        assert leaf.__code__ is not LEAF_CODE and code_of(leaf) is LEAF_CODE
        assert not_instrumented.__code__ is NOT_INSTRUMENTED_CODE


def test_install_and_uninstall_are_idempotent(state: mmsb.MMSBState) -> None:
    _enable(state)
    mgr = manager_of(state)
    assert mgr is not None and mgr.calls is not None
    mgr.calls.install()
    mgr.calls.install()
    mgr.calls.uninstall(flush=False)
    assert not hook_installed()
    mgr.calls.uninstall(flush=False)
    mgr.calls.install()
    leaf(1)
    mmsb.disable_instrumentation(state)
    assert not hook_installed()
    if sys.version_info >= (3, 12):
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        assert all(mon.get_tool(i) is None for i in range(6))


def test_threads_calling_while_another_writes(state: mmsb.MMSBState) -> None:
    _enable(state, flush_every=16, ring_capacity=1 << 16)
    page = mmsb.create_page(state, 64)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            mmsb.write_page(state, page.id, i % 60, bytes([i % 256]) * 4)
            i += 1

    def caller() -> None:
        for i in range(400):
            leaf(i)

    w = threading.Thread(target=writer)
    w.start()
    callers = [threading.Thread(target=caller) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    stop.set()
    w.join()
    mmsb.flush_call_events(state)
    per_ring: dict[int, int] = {}
    for e in mmsb.call_events(state):
        per_ring[e.ring_page] = per_ring.get(e.ring_page, 0) + 1
    assert sorted(per_ring.values()) == [400] * 4
    assert mmsb.verify_state_consistency(state)


# -- what a call is: the same on both paths (sys.monitoring; trampolines before 3.12) --------

def fact(n: int) -> int:
    return 1 if n <= 1 else n * fact(n - 1)


def raiser(exc: BaseException) -> None:
    raise exc


def counter(n: int) -> Any:
    total = 0
    for i in range(n):
        got = yield i
        total += got or 0
    return total


async def doubled(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


async def agen(n: int) -> Any:
    for i in range(n):
        yield i


class Kit:
    def __init__(self, base: int) -> None:
        self.base = base

    def plain(self, x: int) -> int:
        return self.base + x

    @staticmethod
    def static(x: int) -> int:
        return x - 1

    @classmethod
    def build(cls, base: int) -> Kit:
        return cls(base)


REGISTRY = {"leaf": leaf}
"""A reference taken before instrumentation (as a registry or `from m import f` would)."""


def _make_closure() -> Any:
    hits = 0

    def closure(x: int) -> int:
        nonlocal hits
        hits += 1
        return x + hits

    return closure


CLOSURE = _make_closure()


def _names(st: mmsb.MMSBState) -> list[str]:
    mmsb.flush_call_events(st)
    return [e.name.split(":")[1] for e in mmsb.call_events(st)]


def test_recursion_records_every_level(state: mmsb.MMSBState) -> None:
    _enable(state, functions=(fact,))
    assert fact(4) == 24
    mmsb.flush_call_events(state)
    events = mmsb.call_events(state)
    assert [e.depth for e in events] == [3, 2, 1, 0]  # innermost returns first
    durations = [e.duration_ns for e in events]
    assert durations == sorted(durations)
    starts = [e.start_ns for e in events]
    assert starts == sorted(starts, reverse=True)


def test_an_exception_passes_through_unchanged_and_the_call_is_recorded(
        state: mmsb.MMSBState) -> None:
    _enable(state, functions=(raiser,))
    err = KeyError("k")
    with pytest.raises(KeyError) as info:
        raiser(err)
    assert info.value is err
    tb = info.value.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    assert tb is not None and tb.tb_frame.f_code is code_of(raiser)  # raised in its code
    with pytest.raises(SystemExit):
        raiser(SystemExit(3))
    mmsb.flush_call_events(state)
    events = mmsb.call_events(state)
    assert [e.name.split(":")[1] for e in events] == ["raiser", "raiser"]
    assert all(e.duration_ns >= 0 and e.depth == 0 for e in events)


def test_a_generator_is_recorded_per_activation(state: mmsb.MMSBState) -> None:
    _enable(state, functions=(counter,))
    assert inspect.isgeneratorfunction(counter)
    g = counter(3)
    assert _names(state) == []  # made, not started: nothing ran
    assert next(g) == 0
    assert g.send(5) == 1
    assert g.send(None) == 2
    with pytest.raises(StopIteration) as stop:
        g.send(1)
    assert stop.value.value == 6
    assert _names(state) == ["counter"] * 4
    # throw() and close() resume it unrecorded (sys.monitoring: PY_THROW).
    g2 = counter(3)
    next(g2)
    g2.close()
    g3 = counter(3)
    next(g3)
    with pytest.raises(ValueError):
        g3.throw(ValueError("into it"))
    assert _names(state) == ["counter"] * 6


def test_a_coroutine_is_recorded_per_activation(state: mmsb.MMSBState) -> None:
    _enable(state, functions=(doubled,))
    assert inspect.iscoroutinefunction(doubled)
    assert asyncio.run(doubled(21)) == 42
    assert _names(state) == ["doubled", "doubled"]  # to the await, then to the return


def test_async_generators(state: mmsb.MMSBState) -> None:
    _enable(state, functions=(agen,))

    async def consume() -> list[int]:
        return [x async for x in agen(3)]

    assert asyncio.run(consume()) == [0, 1, 2]
    names = _names(state)
    if MONITORING:
        assert names and set(names) == {"agen"}
    else:  # not recorded before 3.12, and said so
        assert names == []
        mgr = manager_of(state)
        assert mgr is not None and any("async generator" in n for n in mgr.notes)


def test_references_taken_before_instrumentation_are_seen(state: mmsb.MMSBState) -> None:
    kit = Kit(10)
    bound = kit.plain
    _enable(state, functions=(leaf, Kit.plain, Kit.static, Kit.build, CLOSURE))
    assert REGISTRY["leaf"](2) == 4
    assert bound(1) == 11 and kit.plain(2) == 12
    assert Kit.static(5) == 4 and kit.static(5) == 4
    assert Kit.build(3).base == 3
    assert CLOSURE(1) == 2 and CLOSURE(1) == 3  # its cell is the one it always had
    assert _names(state) == ["leaf", "Kit.plain", "Kit.plain", "Kit.static", "Kit.static",
                             "Kit.build", "_make_closure.<locals>.closure",
                             "_make_closure.<locals>.closure"]


def test_a_bound_method_is_instrumented_through_its_function(state: mmsb.MMSBState) -> None:
    _enable(state, functions=(Kit(1).plain,))
    assert Kit(2).plain(3) == 5
    assert _names(state) == ["Kit.plain"]


def test_a_redefined_function_is_recaptured_and_recorded(state: mmsb.MMSBState) -> None:
    def target(x: int) -> int:
        return x

    def replacement(x: int) -> int:
        return x + 100

    _enable(state, functions=(target,))
    ir_page = mmsb.code_pages(state, target)["ir"]
    before = mmsb.query_page(state, ir_page)
    age = mmsb.world_age()
    assert target(1) == 1
    target.__code__ = replacement.__code__
    assert mmsb.refresh_code(state) == [f"{__name__}:{target.__qualname__}"]
    assert mmsb.world_age() == age + 1
    assert mmsb.query_page(state, ir_page) != before
    assert code_of(target) is replacement.__code__
    assert target(1) == 101
    assert _names(state) == [target.__qualname__] * 2
    mmsb.disable_instrumentation(state)
    assert target.__code__ is replacement.__code__  # the redefinition stays
    assert target(1) == 101


def test_threads_keep_their_own_depths(state: mmsb.MMSBState) -> None:
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            assert outer(3) == 6
            assert fact(3) == 6

    _enable(state, functions=(leaf, outer, fact), flush_every=7)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mmsb.flush_call_events(state)
    per_ring: dict[int, list[tuple[str, int]]] = {}
    for e in mmsb.call_events(state):
        per_ring.setdefault(e.ring_page, []).append((e.name.split(":")[1], e.depth))
    one = [("leaf", 1)] * 3 + [("outer", 0), ("fact", 2), ("fact", 1), ("fact", 0)]
    assert sorted(map(len, per_ring.values())) == [350] * 4
    assert all(v == one * 50 for v in per_ring.values())


def test_closures_of_one_factory_given_together_are_all_recorded(state: mmsb.MMSBState) -> None:
    first, second = _make_closure(), _make_closure()
    _enable(state, functions=(first, second))
    assert first(0) == 1 and second(0) == 1 and second(0) == 2
    assert _names(state) == ["_make_closure.<locals>.closure"] * 3


def test_enabling_and_disabling_while_other_threads_call(state: mmsb.MMSBState) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * 3

    def caller(k: int) -> None:
        try:
            while not stop.is_set():
                assert outer(3) == 6 and list(counter(2)) == [0, 1]
                done[k] += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            _enable(state, functions=(leaf, outer, counter), flush_every=8)
            seen, until = sum(done), time.monotonic() + 10
            while sum(done) < seen + 6 and not errors and time.monotonic() < until:
                time.sleep(0.001)
            mmsb.disable_instrumentation(state)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert not hook_installed() and code_of(leaf) is LEAF_CODE and leaf.__code__ is LEAF_CODE
    assert all(e.name.split(":")[1] in ("leaf", "outer", "counter")
               for e in mmsb.call_events(state))
    assert len(mmsb.call_events(state)) > 0
