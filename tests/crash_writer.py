"""Writer process for the crash tests (tests/test_crash.py, tests/test_durable.py).

Usage::

    python tests/crash_writer.py DIR ROUND FSYNC [MAX_WRITES] [SEGMENT_BYTES] [MAX_TLOG]

The process imports mmsb, then waits for one line on stdin (so that a test can start
it ahead of time and pay the interpreter start-up while it checks the previous round).
Then it opens the durable bus in DIR, prints ``open <last_lsn>``, and writes in a loop:
write ``i`` of round ``ROUND`` is ``plan(ROUND, i, sizes)`` — deterministic, so the test
can recompute every write's effect. After each write call returns it prints one
acknowledgement line and flushes stdout::

    ack <i> <page id> <epoch after the write> <sha1 of the page bytes after the write>

With MAX_WRITES it stops writing after that many writes, prints ``done`` and sleeps
until it is killed (the test kills it with SIGKILL either way; it never stops the bus).

Fork-server mode, for the crash loop (one interpreter start-up for all rounds)::

    python tests/crash_writer.py --zygote DIR FSYNC SEGMENT_BYTES MAX_TLOG [RETAIN]

imports mmsb once and loads the compiled kernels a writer uses on a scratch bus (see
``warm``), then reads commands on stdin: ``go ROUND`` forks a child that opens
the bus *after the fork* and runs the same write loop (its lines go to the shared
stdout, each in one ``os.write`` smaller than PIPE_BUF, so lines never interleave or
tear); ``kill`` sends that child SIGKILL, reaps it and prints ``dead``; ``quit`` exits.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


def plan(round_no: int, i: int, sizes: dict[int, int]) -> tuple[str, int, int, bytes]:
    """Write ``i`` of round ``round_no``: ``(kind, page id, offset, bytes)``.

    ``kind`` is ``"update"`` (update_page of the whole page, offset 0) or ``"write"``
    (write_page of 8 bytes at offset). The bytes always differ from the page's current
    content (they hold a digest of the round and the counter), so every write is one
    logged delta that raises the page's epoch by exactly one.
    """
    ids = sorted(sizes)
    pid = ids[(i * 7 + round_no) % len(ids)]
    size = sizes[pid]
    h = hashlib.sha256(f"{round_no}:{i}".encode()).digest()
    if i % 3 == 0:
        reps = size // len(h) + 1
        return "update", pid, 0, (h * reps)[:size]
    offset = h[0] * 257 % (size - 8)
    return "write", pid, offset, h[8:16]


def apply(kind: str, old: bytes, offset: int, data: bytes) -> bytes:
    """The page bytes after a planned write."""
    if kind == "update":
        return bytes(data)
    return old[:offset] + data + old[offset + len(data):]


def digest(b: bytes) -> str:
    return hashlib.sha1(b, usedforsecurity=False).hexdigest()


def say(line: str) -> None:
    """One line to stdout in a single write(2): it reaches the pipe whole or not at all."""
    data = (line + "\n").encode()
    assert len(data) < 4096
    n = os.write(1, data)
    assert n == len(data)


def write_loop(directory: str, round_no: int, fsync: str, max_writes: int | None,
               segment_bytes: int, max_tlog: int, retain: int | None = None) -> None:
    import mmsb

    cfg = mmsb.MMSBConfig(enable_gpu=False, fsync=fsync, segment_bytes=segment_bytes,
                          max_tlog_size=max_tlog, retain_checkpoints=retain)
    state = mmsb.mmsb_start(path=directory, config=cfg)
    say(f"open {state.last_lsn}")
    sizes = {pid: int(p.size) for pid, p in state.pages.items()}
    i = 0
    while max_writes is None or i < max_writes:
        pid, epoch = write(state, round_no, i, sizes)
        say(f"ack {i} {pid} {epoch} {digest(mmsb.query_page(state, pid))}")
        i += 1
    say("done")
    while True:
        time.sleep(60)


def serve(run: Callable[[list[str]], None]) -> int:
    """The fork-server loop (mmsb is imported before): ``go ARGS…`` forks a child that
    calls ``run(ARGS)`` (it never returns: the child exits after), ``kill`` SIGKILLs
    and reaps it and prints ``dead``, ``quit`` ends the loop."""
    say("ready")
    child = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "go":
            sys.stdout.flush()
            child = os.fork()
            if child == 0:
                try:
                    run(cmd[1:])
                finally:
                    os._exit(1)
            say(f"child {child}")
        elif cmd[0] == "kill":
            if child:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                child = 0
            say("dead")
        elif cmd[0] == "quit":
            break
    if child:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return 0


def warm(**config: Any) -> None:
    """Load, once in the fork server, the compiled kernels a writer's rounds use: numba
    builds its typing context on the first call of a process (most of a second), which
    every forked writer would otherwise pay before it opens the bus, so that a kill
    soon after the fork would land in that start-up instead of the bus's open. A
    scratch bus is written and stopped; a forked child reopens it, writes and exits
    without stopping (as a killed writer); the bus is then recovered, written and
    stopped again. Nothing of it is left, and no thread runs after it."""
    import shutil
    import tempfile

    import mmsb

    cfg = mmsb.MMSBConfig(enable_gpu=False, **config)
    n = 2 * cfg.max_tlog_size  # (checkpoints and segment rolls included)
    scratch = tempfile.mkdtemp(prefix="mmsb-warm-")
    try:
        state = mmsb.mmsb_start(path=scratch, config=cfg)
        sizes = {mmsb.create_page(state, size).id: size for size in (64, 300)}
        for i in range(n):
            write(state, -1, i, sizes)
        mmsb.mmsb_stop(state)
        child = os.fork()
        if child == 0:
            try:
                state = mmsb.mmsb_start(path=scratch, config=cfg)
                for i in range(n):
                    write(state, -2, i, sizes)
            finally:
                os._exit(0)  # as a killed writer: nothing stopped or flushed
        os.waitpid(child, 0)
        state = mmsb.mmsb_start(path=scratch, config=cfg)
        for i in range(n):
            write(state, -3, i, sizes)
        mmsb.mmsb_stop(state)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write(state: Any, round_no: int, i: int, sizes: dict[int, int]) -> tuple[int, int]:
    """Make write ``i`` of round ``round_no`` (see :func:`plan`); (page id, its epoch
    after the write)."""
    import mmsb

    kind, pid, offset, data = plan(round_no, i, sizes)
    if kind == "update":
        page = mmsb.update_page(state, pid, data)
    else:
        page = mmsb.write_page(state, pid, offset, data)
    return pid, int(page.epoch)


def zygote(directory: str, fsync: str, segment_bytes: int, max_tlog: int,
           retain: int | None) -> int:
    import mmsb  # noqa: F401 - imported once, before any fork

    warm(fsync=fsync, segment_bytes=segment_bytes, max_tlog_size=max_tlog,
         retain_checkpoints=retain)
    return serve(lambda args: write_loop(directory, int(args[0]), fsync, None, segment_bytes,
                                         max_tlog, retain))


def main(argv: list[str]) -> int:
    if argv[0] == "--zygote":
        retain = int(argv[5]) if len(argv) > 5 and argv[5] != "-" else None
        return zygote(argv[1], argv[2], int(argv[3]), int(argv[4]), retain)
    directory, round_no, fsync = argv[0], int(argv[1]), argv[2]
    max_writes = int(argv[3]) if len(argv) > 3 and argv[3] != "-" else None
    segment_bytes = int(argv[4]) if len(argv) > 4 else 4096
    max_tlog = int(argv[5]) if len(argv) > 5 else 64
    import mmsb  # noqa: F401 - start-up paid before "go"

    sys.stdin.readline()  # "go"
    write_loop(directory, round_no, fsync, max_writes, segment_bytes, max_tlog)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
