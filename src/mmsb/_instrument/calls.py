"""Call events of instrumented code, in one bounded ring page per thread.

Where the interpreter has ``sys.monitoring`` (3.12+), the recorder asks for start and
end events of the instrumented code objects only, so other code runs untouched. On
older interpreters each instrumented function's ``__code__`` is swapped for a
trampoline (:mod:`.trampoline`) that records the call around a private copy of the
function: no process-wide hook is installed, other code (numpy's Python functions, the
standard library, uninstrumented modules) runs untouched, and every reference to the
function object sees the recording, whichever way it was taken and whenever.
Disabling puts each function's own code object back.

What counts as a call is the same on both paths: a plain function's call, from entry to
return or to an exception leaving it; a generator's or coroutine's *activation*, from
each ``next()``/``send()`` (the first one starts it) to the next ``yield``/``await``
suspension, return or exception. A resume through ``throw()`` or ``close()`` is not
recorded (``sys.monitoring`` reports it as ``PY_THROW``, which the recorder does not
ask for). Async generators are recorded by ``sys.monitoring`` only.

Each call of an instrumented function gives one record (function page, depth, start
time, duration, sequence number). Records are buffered per thread (at most the ring's
capacity; the oldest go first) and written to the thread's ring page as one logged
batch when ``flush_every`` of them wait and the state can take a write (not inside a
batch, a propagation pass or another thread's call), or by :func:`flush`.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
import time
import types
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, SerializationError
from . import trampoline
from .ir import code_of

if TYPE_CHECKING:
    from .._core.engine import MMSBState
    from .manager import Instrumentation

__all__ = [
    "CallRecorder", "CallEvent", "RING_MAGIC", "RING_VERSION", "RING_RECORD", "RING_META",
    "decode_ring", "ring_pages", "read_call_events", "MONITORING", "recording_state",
    "hook_installed",
]

RING_MAGIC = b"MMSBRING"
RING_VERSION = 1
_HEADER = struct.Struct("<8sHHIQQ")
"""magic, version, record size, capacity, thread id, records ever written."""
RING_RECORD = np.dtype([("function", "<u4"), ("depth", "<u4"), ("start_ns", "<i8"),
                        ("duration_ns", "<i8"), ("seq", "<u8")])
"""One call: the function's code page, nesting depth among recorded calls, wall-clock
start (ns since the Unix epoch), duration (ns), and its number in the thread's calls."""
RING_META = "call_ring"
"""Metadata key of a ring page: {"thread_id", "thread_name", "capacity"}."""
CALLS_SOURCE = "calls"

MONITORING = sys.version_info >= (3, 12)
"""True where ``sys.monitoring`` carries the call events (else code trampolines)."""

_recording: list[CallRecorder] = []
_recording_lock = threading.Lock()


def hook_installed() -> bool:
    """True while a call hook of MMSB is installed: a ``sys.monitoring`` tool named
    "mmsb", or (before 3.12) a recorder recording or a trampoline in some function."""
    if MONITORING:
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        return any(mon.get_tool(i) == "mmsb" for i in range(6))
    with _recording_lock:
        recording = any(r.active for r in _recording)
    return recording or trampoline.installed() > 0


def recording_state() -> Any:
    """The state whose calls are being recorded in this process (None if none)."""
    with _recording_lock:
        return _recording[0].mgr.state() if _recording else None


def check_can_record(recorder: CallRecorder | None = None) -> None:
    """Refuse to record calls when another state records them (checked before anything
    is enabled). Profile and trace functions (``cProfile``, ``coverage``, debuggers)
    are no obstacle: neither path installs one.

    Raises:
        InvalidArgumentError: naming what is in the way.
    """
    with _recording_lock:
        other = _recording[0] if _recording else None
    if other is not None and other is not recorder:
        if other.mgr.state() is None:
            other.uninstall(flush=False)  # its state was stopped: it records nothing
        else:
            raise InvalidArgumentError(
                "calls of instrumented code are already recorded for another state; "
                "disable its instrumentation (or its calls option) first")


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One recorded call, as read back from a ring page."""

    function_page: int
    """The code page (IR page) of the function called."""
    name: str
    """The function's unit name (``module:qualname``), from its page's metadata."""
    thread_id: int
    depth: int
    start_ns: int
    duration_ns: int
    seq: int
    ring_page: int
    """The ring page it was read from (one per thread that made calls)."""


class _Thread:
    __slots__ = ("stack", "depth", "buf", "thread_id", "name", "page", "written", "taken",
                 "counts", "thread")

    def __init__(self, capacity: int) -> None:
        t = threading.current_thread()
        self.thread = weakref.ref(t)
        self.stack: list[tuple[Any, int, int]] = []
        """``sys.monitoring``: (code, function page, start) of each open call."""
        self.depth = 0
        """Trampolines: open recorded calls (the depth of the next one)."""
        self.buf: deque[tuple[int, int, int, int]] = deque(maxlen=capacity)
        self.thread_id = threading.get_native_id()
        self.name = t.name
        self.page = 0
        self.written = 0
        """Records written to the ring page so far."""
        self.taken = 0
        """Records appended to the buffer so far (written + waiting + dropped)."""
        self.counts: dict[int, int] = {}


_PLAIN = """def f({params}):
    try:
        {tb} = {tls}.tb
    except {nothread}:
        {tb} = {rec}._thread()
    {d} = {tb}.depth
    {tb}.depth = {d} + 1
    {t0} = {perf}()
    try:
        return {inner}({args})
    finally:
        {t1} = {perf}()
        {tb}.depth = {d}
{done}
"""
"""A plain function's trampoline (see :func:`trampoline.build` for the fields); it
records as the ``sys.monitoring`` path's ``_done`` does, inline: ``{done}`` is one of
the two below."""
_RECORD = """        {{tb}}.buf.append(({fid}, {{d}}, {{t0}}, {{t1}} - {{t0}}))
        {{tb}}.taken += 1
        if {{len}}({{tb}}.buf) >= {limit}:
            {{rec}}.flush_thread({{tb}}, True)"""
_RECORD_SAMPLED = """        {{rec}}._done({{tb}}, {fid}, {{d}}, {{t0}}, {{t1}})"""
_GENERATOR = """def f({params}):
    return (yield from {seg}({inner}({args})))
"""
_COROUTINE = """async def f({params}):
    return await {seg}({inner}({args}))
"""


class _Segments:
    """What a generator's or coroutine's trampoline delegates to: drives the function's
    own generator (coroutine) and records each activation entered by ``next()`` or
    ``send()``; ``throw()`` and ``close()`` are passed on unrecorded (as
    ``sys.monitoring`` reports them: ``PY_THROW``, which the recorder does not ask for)."""

    __slots__ = ("rec", "fid", "it")

    def __init__(self, rec: CallRecorder, fid: int, it: Any) -> None:
        self.rec = rec
        self.fid = fid
        self.it = it

    def __iter__(self) -> _Segments:
        return self

    def __await__(self) -> _Segments:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        rec = self.rec
        try:
            tb = rec.tls.tb
        except AttributeError:
            tb = rec._thread()
        depth = tb.depth
        tb.depth = depth + 1
        t0 = time.perf_counter_ns()
        try:
            return self.it.send(value)
        finally:
            t1 = time.perf_counter_ns()
            tb.depth = depth
            rec._done(tb, self.fid, depth, t0, t1)

    def throw(self, *args: Any) -> Any:
        return self.it.throw(*args)

    def close(self) -> None:
        self.it.close()


class CallRecorder:
    """Records calls of one manager's instrumented code."""

    def __init__(self, mgr: Instrumentation) -> None:
        self.mgr = mgr
        cfg = mgr.config
        self.settings = (cfg.call_sample_every, cfg.flush_every, cfg.ring_capacity)
        self.codes: dict[int, int] = {}
        """id(code object) → its function's code page."""
        self._keep: list[types.CodeType] = []
        self.threads: list[_Thread] = []
        """One per thread that made a recorded call (a thread's id may be reused by a
        later thread, so they are not keyed by it); dropped once ended and flushed."""
        self.tls = threading.local()
        self.active = False
        self.offset = time.time_ns() - time.perf_counter_ns()
        self.dropped = 0
        self.targets: dict[int, tuple[types.FunctionType, types.CodeType, int]] = {}
        """Trampolines: id(function) → (the function, its code, its code page): the
        functions whose calls are recorded while the recorder is active."""
        self.swapped: dict[int, tuple[types.FunctionType, types.CodeType, types.CodeType]] = {}
        """Trampolines: id(function) → (the function, the trampoline installed in it,
        the code object it replaced), while installed."""
        self._built: dict[int, tuple[types.CodeType, int, types.CodeType]] = {}
        """Trampolines: id(function) → (its code, its page, the trampoline built), kept
        across uninstall/install of this recorder (the function is in ``targets``)."""
        self._tool: int | None = None
        self._flushing = threading.local()
        self._swapping = threading.RLock()
        """Held while trampolines go in or out: an import capturing a module in one
        thread cannot put one in after another thread's disabling took them out."""

    # -- installing ------------------------------------------------------------------------
    def check_can_install(self) -> None:
        check_can_record(self)

    def install(self) -> None:
        if self.active:
            return
        self.check_can_install()
        with _recording_lock:
            if self not in _recording:
                _recording.append(self)
        for unit, code in list(self.mgr.by_code.values()):
            if id(code) not in self.codes:
                self._keep.append(code)
            self.codes[id(code)] = unit.code_page
            if not MONITORING and unit.unit == "function" and unit.obj is not None:
                self._target(unit.obj(), code, unit.code_page)
        if not MONITORING:
            # A unit remembers one function; the config may name several function
            # objects running the same code (closures made by one factory).
            for obj in self.mgr.config.functions:
                own = code_of(obj)
                found = self.mgr.by_code.get(id(own)) if own is not None else None
                if own is not None and found is not None and found[1] is own:
                    self._target(obj, own, found[0].code_page)
        if MONITORING:
            self.active = True
            self._install_monitoring()
            return
        with self._swapping:
            self.active = True
            for fn, code, page in list(self.targets.values()):
                self._swap(fn, code, page)

    def add(self, code: types.CodeType, page: int, obj: Any = None) -> None:
        """Record calls of ``code`` (the code of ``obj``, a function or method) from now
        on: a unit captured or recaptured."""
        if id(code) not in self.codes:  # else it is kept already (so its id is its own)
            self._keep.append(code)
        self.codes[id(code)] = page
        if MONITORING:
            if self._tool is not None:
                mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
                mon.set_local_events(self._tool, code, self._local_events)
            return
        with self._swapping:
            fn = self._target(obj, code, page)
            if fn is not None and self.active:
                self._swap(fn, code, page)

    def resync(self) -> None:
        """Trampolines: put a trampoline back into each function whose code was set back
        to the code it replaced (other changes of ``__code__`` are recaptures: the
        manager calls :meth:`add` with the new code)."""
        if MONITORING:
            return
        with self._swapping:
            for fn, code, page in list(self.targets.values()):
                if self.active and fn.__code__ is code:
                    self._swap(fn, code, page)

    def uninstall(self, flush: bool = True) -> None:
        if flush:
            try:
                self.flush()
            except Exception as exc:  # a closed state, a refused write: the records go
                self.mgr._note(f"call records not flushed at disable: {exc}")
        if MONITORING:
            self.active = False
            self._uninstall_monitoring()
        else:
            with self._swapping:
                self.active = False
                for key in list(self.swapped):
                    self._unswap(key)
        with _recording_lock:
            if self in _recording:
                _recording.remove(self)

    # -- trampolines -----------------------------------------------------------------------
    def _target(self, obj: Any, code: types.CodeType, page: int) -> types.FunctionType | None:
        """The function behind ``obj`` whose code is ``code``, remembered as one whose
        calls are recorded (None, with a note, when there is none)."""
        fn = trampoline.function_of(obj)
        if fn is None or trampoline.real_code(fn.__code__) is not code:
            return None
        if trampoline.kind_of(code) is None:
            self.mgr._note(f"{code.co_qualname}: an async generator; its calls are recorded "
                           "only where the interpreter has sys.monitoring (3.12+)")
            return None
        self.targets[id(fn)] = (fn, code, page)
        return fn

    def _swap(self, fn: types.FunctionType, code: types.CodeType, page: int) -> None:
        """Install a trampoline for ``code`` in ``fn`` (replacing one it has)."""
        current = self.swapped.get(id(fn))
        if current is not None and current[0] is fn and fn.__code__ is current[1] \
                and current[2] is code:
            return  # in place already
        if fn.__code__ is not code and (current is None or fn.__code__ is not current[1]):
            return  # changed since it was captured: the recapture brings the new code
        if current is not None:
            self._unswap(id(fn))
        built = self._built.get(id(fn))
        if built is not None and built[0] is code and built[1] == page \
                and self.targets.get(id(fn), (None,))[0] is fn:
            tramp = built[2]
        else:
            try:
                tramp = self._build(fn, code, page)
            except (ValueError, SyntaxError, RecursionError) as exc:
                # The program runs on unrecorded rather than fail the enabling.
                self.mgr._note(f"{fn.__qualname__}: no trampoline ({exc}); its calls are "
                               "not recorded")
                return
        self._built[id(fn)] = (code, page, tramp)
        trampoline.register(tramp, code)
        fn.__code__ = tramp
        self.swapped[id(fn)] = (fn, tramp, code)

    def _unswap(self, key: int) -> None:
        fn, tramp, code = self.swapped.pop(key)
        if fn.__code__ is tramp:
            fn.__code__ = code  # the very code object it had
        trampoline.unregister(tramp)

    @staticmethod
    def _copy(fn: types.FunctionType, code: types.CodeType) -> types.FunctionType:
        """A private function running ``code`` with ``fn``'s globals and closure cells
        (the trampoline passes every argument, so it needs no defaults)."""
        inner = types.FunctionType(code, fn.__globals__, code.co_name, None, fn.__closure__)
        inner.__qualname__ = fn.__qualname__
        return inner

    def _build(self, fn: types.FunctionType, code: types.CodeType, page: int
               ) -> types.CodeType:
        """The trampoline recording the calls of ``fn`` (running ``code``) as calls of
        ``page``. A plain function's records inline (the hot path: one frame in front of
        the function's own, no Python call but the function's); a generator's or
        coroutine's delegates to :class:`_Segments`."""
        inner = self._copy(fn, code)
        kind = trampoline.kind_of(code)
        if kind == trampoline.GENERATOR:
            return trampoline.build(code, _GENERATOR, {
                "seg": functools.partial(_Segments, self, page), "inner": inner})
        if kind == trampoline.COROUTINE:
            return trampoline.build(code, _COROUTINE, {
                "seg": functools.partial(_Segments, self, page), "inner": inner})
        cfg = self.mgr.config
        done = (_RECORD_SAMPLED if cfg.call_sample_every > 1 else _RECORD).format(
            fid=page, limit=cfg.flush_every)
        return trampoline.build(code, _PLAIN.replace("{done}", done), {
            "tls": self.tls, "rec": self, "perf": time.perf_counter_ns, "inner": inner,
            "nothread": AttributeError, "len": len}, temps=("tb", "d", "t0", "t1"))

    # -- the hooks -------------------------------------------------------------------------
    def _thread(self) -> _Thread:
        tb = _Thread(self.mgr.config.ring_capacity)
        self.tls.tb = tb
        self.threads.append(tb)
        return tb

    def _done(self, tb: _Thread, fid: int, depth: int, t0: int, t1: int) -> None:
        every = self.mgr.config.call_sample_every
        if every > 1:
            n = tb.counts.get(fid, 0)
            tb.counts[fid] = n + 1
            if n % every:
                return
        tb.buf.append((fid, depth, t0, t1 - t0))
        tb.taken += 1
        if len(tb.buf) >= self.mgr.config.flush_every:
            self.flush_thread(tb, opportunistic=True)

    def _install_monitoring(self) -> None:
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        tool = None
        for candidate in (mon.PROFILER_ID, 5, 4, 3):
            if mon.get_tool(candidate) is None:
                tool = candidate
                break
        if tool is None:
            self.active = False
            with _recording_lock:
                _recording.remove(self)
            raise InvalidArgumentError("every sys.monitoring tool id MMSB can use is taken")
        mon.use_tool_id(tool, "mmsb")
        self._tool = tool
        ev = mon.events
        self._local_events = ev.PY_START | ev.PY_RESUME | ev.PY_RETURN | ev.PY_YIELD
        perf = time.perf_counter_ns
        codes = self.codes
        tls = self.tls
        rec = self

        def start(code: Any, offset: int) -> None:
            fid = codes.get(id(code))
            if fid is not None:
                tb = getattr(tls, "tb", None) or rec._thread()
                tb.stack.append((code, fid, perf()))

        def end(code: Any, offset: int, value: Any) -> None:
            tb = getattr(tls, "tb", None)
            if tb is not None and tb.stack and tb.stack[-1][0] is code:
                _c, fid, t0 = tb.stack.pop()
                rec._done(tb, fid, len(tb.stack), t0, perf())

        mon.register_callback(tool, ev.PY_START, start)
        mon.register_callback(tool, ev.PY_RESUME, start)
        mon.register_callback(tool, ev.PY_RETURN, end)
        mon.register_callback(tool, ev.PY_YIELD, end)
        mon.register_callback(tool, ev.PY_UNWIND, end)
        mon.set_events(tool, ev.PY_UNWIND)
        for code in self._keep:
            mon.set_local_events(tool, code, self._local_events)

    def _uninstall_monitoring(self) -> None:
        tool = self._tool
        if tool is None:
            return
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        ev = mon.events
        mon.set_events(tool, 0)
        for code in self._keep:
            mon.set_local_events(tool, code, 0)
        for e in (ev.PY_START, ev.PY_RESUME, ev.PY_RETURN, ev.PY_YIELD, ev.PY_UNWIND):
            mon.register_callback(tool, e, None)
        mon.free_tool_id(tool)
        self._tool = None

    # -- flushing --------------------------------------------------------------------------
    def flush(self) -> int:
        """Write every thread's waiting records to its ring page; returns how many."""
        n = sum(self.flush_thread(tb) for tb in list(self.threads))
        for tb in list(self.threads):
            t = tb.thread()
            if (t is None or not t.is_alive()) and not tb.buf:
                self.threads.remove(tb)
        return n

    def flush_thread(self, tb: _Thread, opportunistic: bool = False) -> int:
        st = self.mgr.state()
        if st is None or getattr(self._flushing, "on", False):
            return 0
        if st.batch_frame is not None or st.recomputing is not None or st.propagating:
            if opportunistic:
                return 0
            raise InvalidArgumentError(
                "call records cannot be flushed inside a batch or a propagation pass; "
                "flush after it")
        if not st.lock.acquire(blocking=not opportunistic):
            return 0
        self._flushing.on = True
        try:
            n = len(tb.buf)
            if n == 0:
                return 0
            records = [tb.buf.popleft() for _ in range(n)]
            if not opportunistic:
                self._write(st, tb, records)
                return n
            try:
                self._write(st, tb, records)
            except Exception as exc:  # a call of the program never fails for a record
                self.mgr._note(f"call records not written ({exc}); counted as lost")
                return 0
            return n
        finally:
            self._flushing.on = False
            st.lock.release()

    def _write(self, st: MMSBState, tb: _Thread, records: list[tuple[int, int, int, int]]) -> None:
        cap = self.mgr.config.ring_capacity
        ops = self.mgr.ops
        if not tb.page or tb.page not in st.pages:
            meta = {RING_META: {"thread_id": tb.thread_id, "thread_name": tb.name,
                                "capacity": cap}}
            page = ops.create_page(st, _HEADER.size + cap * RING_RECORD.itemsize, metadata=meta)
            tb.page = page.id
            tb.written = 0
        arr = np.zeros(len(records), RING_RECORD)
        cols = np.array(records, dtype=np.int64).reshape(-1, 4)
        arr["function"] = cols[:, 0]
        arr["depth"] = cols[:, 1]
        arr["start_ns"] = cols[:, 2] + self.offset
        arr["duration_ns"] = cols[:, 3]
        lost = tb.taken - tb.written - len(records)
        first_seq = tb.written + max(0, lost)
        arr["seq"] = np.arange(first_seq, first_seq + len(records), dtype=np.uint64)
        self.dropped += max(0, lost)
        total = first_seq
        if len(arr) > cap:
            total += len(arr) - cap
            arr = arr[-cap:]
        writes: list[tuple[int, int, bytes]] = []
        slot = total % cap
        head = min(len(arr), cap - slot)
        size = RING_RECORD.itemsize
        writes.append((tb.page, _HEADER.size + slot * size, arr[:head].tobytes()))
        if head < len(arr):
            writes.append((tb.page, _HEADER.size, arr[head:].tobytes()))
        end = first_seq + len(records)
        writes.append((tb.page, 0, _HEADER.pack(RING_MAGIC, RING_VERSION, size, cap,
                                                tb.thread_id, end)))
        ops.apply_batch(st, writes, source=CALLS_SOURCE)
        tb.written = end
        tb.taken = max(tb.taken, end)


# -- reading ring pages ----------------------------------------------------------------------

def decode_ring(data: bytes | bytearray | memoryview) -> tuple[int, int, np.ndarray]:
    """(thread id, records ever written, the retained records oldest first) of a ring
    page's bytes.

    Raises:
        SerializationError: not a ring page of this layout.
    """
    raw = bytes(data)
    if len(raw) < _HEADER.size:
        raise SerializationError(f"call ring: {len(raw)} bytes is shorter than its header")
    magic, version, size, cap, thread_id, total = _HEADER.unpack_from(raw)
    if magic != RING_MAGIC:
        if magic == b"\x00" * 8:
            return 0, 0, np.zeros(0, RING_RECORD)  # created, nothing flushed yet
        raise SerializationError(f"call ring: bad magic {magic!r}")
    if version != RING_VERSION or size != RING_RECORD.itemsize:
        raise SerializationError(f"call ring: unsupported version {version} / record size {size}")
    if cap == 0 or len(raw) != _HEADER.size + cap * size:
        raise SerializationError(f"call ring: {len(raw)} bytes do not hold {cap} records")
    ring = np.frombuffer(raw, RING_RECORD, count=cap, offset=_HEADER.size)
    n = min(total, cap)
    start = total % cap if total > cap else 0
    order = (np.arange(n) + start) % cap
    recs = ring[order].copy()
    # Records lost before a flush leave gaps: a slot counts only if it holds the
    # sequence number that belongs there.
    expected = np.arange(total - n, total, dtype=np.uint64)
    return int(thread_id), int(total), recs[recs["seq"] == expected]


def ring_pages(state: MMSBState) -> dict[int, int]:
    """Ring page → the native id of its thread, for the state's ring pages, oldest
    first (the system may give a later thread the id of one that ended)."""
    out: dict[int, int] = {}
    with state.lock:
        for pid in sorted(state.table.meta):
            info = state.table.meta[pid].get(RING_META)
            if isinstance(info, dict) and state.table.is_live(pid):
                tid = info.get("thread_id", 0)
                out[pid] = tid if isinstance(tid, int) else 0
    return out


def read_call_events(state: MMSBState, thread_id: int | None = None) -> list[CallEvent]:
    """The calls the ring pages hold, per thread oldest first."""
    names: dict[int, str] = {}
    out: list[CallEvent] = []
    rings = ring_pages(state)
    if thread_id is not None:
        rings = {k: v for k, v in rings.items() if v == thread_id}
    for pid in rings:
        with state.lock:
            data = state.page_view(pid).tobytes()
        tid, _total, recs = decode_ring(data)
        for r in recs.tolist():
            fpage = int(r[0])
            if fpage not in names:
                meta = state.table.meta.get(fpage, {}).get("code_artefact", {})
                names[fpage] = str(meta.get("name", "")) if isinstance(meta, dict) else ""
            out.append(CallEvent(fpage, names[fpage], tid, int(r[1]), int(r[2]), int(r[3]),
                                 int(r[4]), pid))
    return out
