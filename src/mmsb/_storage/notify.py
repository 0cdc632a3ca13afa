"""Waiting for a 32-bit counter in a shared mapping to change, across processes.

On Linux this is the ``futex`` system call on the counter's address: a waiter sleeps in
the kernel until a writer calls :func:`wake` on the same word of the same file (the
futex is keyed by the file and offset, so every process that maps the file shares it),
so an idle follower costs no CPU and is woken within microseconds. Elsewhere, or if the
call is refused, :func:`wait` falls back to sleeping in short steps.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time

__all__ = ["wait", "wake", "FUTEX_AVAILABLE"]

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


def wake(addr: int) -> None:
    """Wake every process waiting on the 32-bit word at ``addr`` (an address inside a
    shared mapping). A no-op without futex support."""
    if _wake is not None and addr:
        _wake(_SYS_FUTEX, addr, _FUTEX_WAKE, 0x7FFFFFFF)  # type: ignore[operator]


def wait(addr: int, expected: int, timeout: float | None, current: object) -> None:
    """Sleep until the word at ``addr`` differs from ``expected``, a wake, or ``timeout``
    seconds (``None``: no limit) — whichever is first; spurious returns are possible, so
    callers re-check their condition. ``current`` is a callable returning the word's value
    (used by the polling fallback)."""
    if _syscall is not None:
        ts = None
        if timeout is not None:
            timeout = max(timeout, 0.0)
            ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
        r = _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT,  # type: ignore[operator]
                     ctypes.c_uint32(expected & 0xFFFFFFFF),
                     ctypes.byref(ts) if ts is not None else None, None, 0)
        if r == 0 or ctypes.get_errno() in (11, 4, 110):  # woken, EAGAIN, EINTR, ETIMEDOUT
            return
        # Refused (ENOSYS under some sandboxes): poll from now on.
        _disable()
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
