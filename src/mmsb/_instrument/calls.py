"""Call events of instrumented code, in one bounded ring page per thread.

Where the interpreter has ``sys.monitoring`` (3.12+), the recorder asks for start and
end events of the instrumented code objects only, so other code runs untouched. On
older interpreters it installs the standard library's C profiler (``_lsprof``, the core
of ``cProfile``) in the enabling thread, and in threads started later through a
``threading.setprofile`` hook that installs one there. That profiler is told to ignore
C functions, so a call of a builtin or a numpy function costs nothing more, and it calls
back into Python only through its clock: the recorder's clock looks at the frame that
is starting or ending and returns at once for code it does not know. (A Python profile
function would be called for C functions as well, and 3.11 copies the caller's local
variables into a dict for every one of those calls.)

Each call of an instrumented function gives one record (function page, depth, start
time, duration, sequence number). Records are buffered per thread (at most the ring's
capacity; the oldest go first) and written to the thread's ring page as one logged
batch when ``flush_every`` of them wait and the state can take a write (not inside a
batch, a propagation pass or another thread's call), or by :func:`flush`.
"""

from __future__ import annotations

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
"""True where ``sys.monitoring`` carries the call events (else a C profiler)."""

if not MONITORING:
    import _lsprof

    class _Profiler(_lsprof.Profiler):  # type: ignore[misc,unused-ignore]
        """The C profiler, with room for the ``_mmsb_recorder`` mark that tells MMSB's
        own hook from a foreign one."""

        _mmsb_recorder: Any = None

_recording: list[CallRecorder] = []
_recording_lock = threading.Lock()


def hook_installed() -> bool:
    """True while a call hook of MMSB is installed: a ``sys.monitoring`` tool named
    "mmsb", or MMSB's profile function in this thread (or for new threads)."""
    if MONITORING:
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        return any(mon.get_tool(i) == "mmsb" for i in range(6))
    return any(getattr(p, "_mmsb_recorder", None) is not None
               for p in (sys.getprofile(), threading.getprofile()))


def recording_state() -> Any:
    """The state whose calls are being recorded in this process (None if none)."""
    with _recording_lock:
        return _recording[0].mgr.state() if _recording else None


def check_can_record(recorder: CallRecorder | None = None) -> None:
    """Refuse to record calls when another state records them or a foreign profile
    function is installed (checked before anything is enabled).

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
    if not MONITORING:
        current = sys.getprofile()
        if current is not None and getattr(current, "_mmsb_recorder", None) is None:
            raise InvalidArgumentError(
                f"another profile function ({current!r}) is installed in this thread; "
                "recording calls would replace it (remove it with sys.setprofile(None))")


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
    __slots__ = ("stack", "buf", "thread_id", "name", "page", "written", "taken", "counts",
                 "thread")

    def __init__(self, capacity: int) -> None:
        t = threading.current_thread()
        self.thread = weakref.ref(t)
        self.stack: list[tuple[Any, int, int]] = []
        self.buf: deque[tuple[int, int, int, int]] = deque(maxlen=capacity)
        self.thread_id = threading.get_native_id()
        self.name = t.name
        self.page = 0
        self.written = 0
        """Records written to the ring page so far."""
        self.taken = 0
        """Records appended to the buffer so far (written + waiting + dropped)."""
        self.counts: dict[int, int] = {}


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
        self._prof: Any = None
        self._boot: Any = None
        self._profilers: list[tuple[weakref.ref[threading.Thread], Any]] = []
        """Every C profiler made, with its thread: kept until the thread has ended."""
        self._tool: int | None = None
        self._flushing = threading.local()

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
        self.active = True
        if MONITORING:
            self._install_monitoring()
        else:
            self._prof = self._profiler()
            self._prof.enable(False, False)  # no subcall tables, no C functions
            self._boot = self._make_boot()
            threading.setprofile(self._boot)

    def add(self, code: types.CodeType, page: int) -> None:
        """Record calls of ``code`` from now on (a unit captured or recaptured)."""
        self.codes[id(code)] = page
        self._keep.append(code)
        if MONITORING and self._tool is not None:
            mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
            mon.set_local_events(self._tool, code, self._local_events)

    def uninstall(self, flush: bool = True) -> None:
        if flush:
            try:
                self.flush()
            except Exception as exc:  # a closed state, a refused write: the records go
                self.mgr._note(f"call records not flushed at disable: {exc}")
        self.active = False
        if MONITORING:
            self._uninstall_monitoring()
        else:
            current: Any = sys.getprofile()
            if self._prof is not None and current is self._prof:
                current.disable()
            if threading.getprofile() is self._boot:
                threading.setprofile(None)
        with _recording_lock:
            if self in _recording:
                _recording.remove(self)

    # -- the hooks -------------------------------------------------------------------------
    def _thread(self) -> _Thread:
        tb = _Thread(self.mgr.config.ring_capacity)
        self.tls.tb = tb
        self.threads.append(tb)
        return tb

    def _done(self, tb: _Thread, fid: int, t0: int, t1: int) -> None:
        every = self.mgr.config.call_sample_every
        if every > 1:
            n = tb.counts.get(fid, 0)
            tb.counts[fid] = n + 1
            if n % every:
                return
        tb.buf.append((fid, len(tb.stack), t0, t1 - t0))
        tb.taken += 1
        if len(tb.buf) >= self.mgr.config.flush_every:
            self.flush_thread(tb, opportunistic=True)

    def _profiler(self) -> Any:
        """A C profiler for one thread whose clock records the calls of instrumented
        code (see the module's docstring), kept by the recorder until its thread ends."""
        codes = self.codes
        tls = self.tls
        perf = time.perf_counter_ns
        getframe = sys._getframe
        rec = self
        sampled = self.mgr.config.call_sample_every > 1
        limit = self.mgr.config.flush_every

        # The profiler calls its clock once as a Python function starts and once as it
        # ends (returns, raises, or yields): frame 1 is that function's. The recorder's
        # stack tells the two apart: the top of it is the frame that is ending.
        def clock() -> int:
            frame = getframe(1)
            fid = codes.get(id(frame.f_code))
            if fid is None:
                return 0
            tb = getattr(tls, "tb", None)
            if tb is not None and tb.stack and tb.stack[-1][0] is frame:
                _f, fid, t0 = tb.stack.pop()
                if sampled:
                    rec._done(tb, fid, t0, perf())
                    return 0
                tb.buf.append((fid, len(tb.stack), t0, perf() - t0))
                tb.taken += 1
                if len(tb.buf) >= limit:
                    rec.flush_thread(tb, opportunistic=True)
                return 0
            if not rec.active:
                sys.setprofile(None)  # disabled from another thread: leave this one
                return 0
            if tb is None:
                tb = rec._thread()
            tb.stack.append((frame, fid, perf()))
            return 0

        prof = _Profiler(clock, 1e-9, False, False)
        prof._mmsb_recorder = self
        # A thread can drop its profiler from inside the profiler's own clock, so the
        # recorder holds it until that thread has ended (then nothing can be using it).
        self._profilers = [(t, p) for t, p in self._profilers
                           if (th := t()) is not None and th.is_alive()]
        self._profilers.append((weakref.ref(threading.current_thread()), prof))
        return prof

    def _make_boot(self) -> Any:
        """The ``threading.setprofile`` hook: a thread started while calls are recorded
        runs it once, at its first event, and it installs a C profiler there."""
        rec = self

        def boot(frame: Any, event: str, arg: Any) -> None:
            if rec.active:
                rec._profiler().enable(False, False)  # replaces this hook in this thread
            else:
                sys.setprofile(None)

        boot._mmsb_recorder = self  # type: ignore[attr-defined]
        return boot

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
                rec._done(tb, fid, t0, perf())

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
            self._write(st, tb, records)
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
