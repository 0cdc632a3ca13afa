"""Waiting for a 32-bit counter in a shared mapping to change, across processes.

On Linux this is the ``futex`` system call on the counter's address: a waiter sleeps in
the kernel until a writer calls :func:`wake` on the same word of the same file (the
futex is keyed by the file and offset, so every process that maps the file shares it),
so an idle follower costs no CPU and is woken within microseconds. Elsewhere, or if the
call is refused, :func:`wait` falls back to sleeping in short steps.

A wake is a system call (about 10 µs in a virtual machine), too dear to pay after every
publication when nobody waits. So waiters announce themselves in a second shared word,
a count: a waiter adds one before it checks the counter and sleeps, and takes it back
after; the writer bumps the counter and reads the count, and calls the kernel only when
the count is not zero. Both sides use sequentially consistent atomic operations
(compiled with numba), so either the waiter sees the new counter and does not sleep, or
the writer sees the waiter and wakes it: no wake is lost. A waiter killed while it
sleeps leaves the count raised; that costs the writer one needless wake per publication,
never a lost one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["wait", "wake", "bump", "FUTEX_AVAILABLE"]

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_POLL_STEP = 0.002
"""Sleep of the fallback when no futex is available (seconds)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load() -> object | None:
    if not sys.platform.startswith("linux") or _SYS_FUTEX is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


def _load_wake() -> object | None:
    """A second handle on syscall() with fixed argument types, so a wake passes plain
    ints without building ctypes objects (the writer calls it after every publication)."""
    if _syscall is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return fn


_syscall = _load()
_wake = _load_wake()
FUTEX_AVAILABLE = _syscall is not None


def _add_u32_typer(typingctx: Any, addr: Any, val: Any) -> Any:  # pragma: no cover
    sig = types.uint32(types.int64, types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(32)))
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


def _add_u64_typer(typingctx: Any, addr: Any, val: Any) -> Any:  # pragma: no cover
    sig = types.uint64(types.int64, types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


def _load_u32_typer(typingctx: Any, addr: Any) -> Any:  # pragma: no cover
    sig = types.uint32(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(32)))
        return builder.load_atomic(ptr, "seq_cst", 4)

    return sig, codegen


def _cas_u32_typer(typingctx: Any, addr: Any, old: Any, new: Any) -> Any:  # pragma: no cover
    sig = types.boolean(types.int64, types.uint32, types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(32)))
        pair = builder.cmpxchg(ptr, args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return sig, codegen


# Sequentially consistent atomics on a 32- or 64-bit word at an address (compiled code
# only). Each is also a compiler barrier: no plain load or store moves across it.
_atomic_add_u32: Any = intrinsic(_add_u32_typer)
_atomic_add_u64: Any = intrinsic(_add_u64_typer)
_atomic_load_u32: Any = intrinsic(_load_u32_typer)
_atomic_cas_u32: Any = intrinsic(_cas_u32_typer)


@njit(cache=True, nogil=True)
def _bump(counter: int, waiters: int) -> bool:  # pragma: no cover - compiled
    """Add one to the counter word; True when the waiters word is not zero then."""
    _atomic_add_u32(counter, np.uint32(1))
    return _atomic_load_u32(waiters) != 0


@njit(cache=True, nogil=True)
def _enter_wait(waiters: int, counter: int, expected: int) -> bool:  # pragma: no cover
    """Count this waiter in; True when the counter still holds ``expected`` (sleep),
    else counted out again at once (False: it changed, do not sleep)."""
    _atomic_add_u32(waiters, np.uint32(1))
    if _atomic_load_u32(counter) == np.uint32(expected & 0xFFFFFFFF):
        return True
    _leave_wait(waiters)
    return False


@njit(cache=True, nogil=True)
def _leave_wait(waiters: int) -> None:  # pragma: no cover - compiled
    """Count this waiter out (never below zero)."""
    while True:
        n = _atomic_load_u32(waiters)
        if n == 0 or _atomic_cas_u32(waiters, n, n - np.uint32(1)):
            return


def bump(counter: int, waiters: int) -> None:
    """Add one to the 32-bit counter at ``counter`` and wake its waiters, calling the
    kernel only when the count at ``waiters`` says somebody waits (both addresses in
    shared writable mappings). ``waiters`` 0: always wake."""
    if not waiters:
        ctypes.c_uint32.from_address(counter).value += 1
        wake(counter)
    elif _bump(counter, waiters):
        wake(counter)


def wake(addr: int) -> None:
    """Wake every process waiting on the 32-bit word at ``addr`` (an address inside a
    shared mapping). A no-op without futex support."""
    if _wake is not None and addr:
        _wake(_SYS_FUTEX, addr, _FUTEX_WAKE, 0x7FFFFFFF)  # type: ignore[operator]


def wait(addr: int, expected: int, timeout: float | None, current: object,
         waiters: int = 0) -> None:
    """Sleep until the word at ``addr`` differs from ``expected``, a wake, or ``timeout``
    seconds (``None``: no limit) — whichever is first; spurious returns are possible, so
    callers re-check their condition. ``current`` is a callable returning the word's value
    (used by the polling fallback). ``waiters``: address of the writable count of waiters
    the writer reads before it wakes (see the module's docstring); 0 when this process
    cannot write it, and then the sleep is cut into short steps, since the writer may not
    call the kernel for it."""
    if _syscall is not None:
        if waiters:
            if not _enter_wait(waiters, addr, expected):
                return
            try:
                done = _futex_wait(addr, expected, timeout)
            finally:
                _leave_wait(waiters)
        else:
            done = _futex_wait(addr, expected,
                               _POLL_STEP if timeout is None else min(timeout, _POLL_STEP))
        if done:
            return
    _poll(expected, timeout, current)


def _futex_wait(addr: int, expected: int, timeout: float | None) -> bool:
    """One futex sleep; False when the kernel refuses the call (then never again)."""
    if _syscall is not None:
        ts = None
        if timeout is not None:
            timeout = max(timeout, 0.0)
            ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
        r = _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT,  # type: ignore[operator]
                     ctypes.c_uint32(expected & 0xFFFFFFFF),
                     ctypes.byref(ts) if ts is not None else None, None, 0)
        if r == 0 or ctypes.get_errno() in (11, 4, 110):  # woken, EAGAIN, EINTR, ETIMEDOUT
            return True
        # Refused (ENOSYS under some sandboxes): poll from now on.
        _disable()
    return False


def _poll(expected: int, timeout: float | None, current: object) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while current() == expected:  # type: ignore[operator]
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(_POLL_STEP)


def _disable() -> None:
    global _syscall, _wake, FUTEX_AVAILABLE
    _syscall = _wake = None
    FUTEX_AVAILABLE = False


if os.environ.get("MMSB_NO_FUTEX"):
    _disable()
