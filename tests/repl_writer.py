"""Leader process for the replication tests (tests/test_replication.py).

Fork-server mode (one interpreter start-up for all rounds)::

    python tests/repl_writer.py URL ACK PAGES

imports mmsb once, loads the compiled kernels of its durable writes (``warm`` in
crash_writer.py), prints ``ready``, then reads commands on stdin: ``go DIR ROUND``
forks a child that opens the bus in DIR as the leader (``replicate_to=URL``,
``ack=ACK``) and writes in a loop; ``kill`` sends that child SIGKILL, reaps it and
prints ``dead``; ``quit`` exits. Each write is a batch of two writes (one record group)
to two pages, with the same tag in both: a follower that held half a batch would show
two different tags. After each call returns (acknowledged as ACK says) the child
prints ``bus <id>`` once the bus is open (so that a follower can start before the
first acknowledged call), ``open <last LSN> <term>`` once its pages exist, then, in one
write(2)::

    ack <lsn> <page id> <sha1 of the page after the call>

A refused open prints ``refused <reason>`` and the child exits.
"""

from __future__ import annotations

import hashlib
import os
import sys

from crash_writer import say, serve, warm

MAX_TLOG = 300
"""The leader's ``max_tlog_size``: checkpoints every 300 records."""


def write_loop(url: str, ack: str, pages: int, directory: str, round_no: int) -> None:
    import mmsb

    cfg = mmsb.MMSBConfig(enable_gpu=False, replicate_to=url, ack=ack, ack_timeout=30,
                          replication_lease=1.0, max_tlog_size=MAX_TLOG)
    try:
        state = mmsb.mmsb_start(path=directory, config=cfg)
    except mmsb.MMSBError as exc:
        say(f"refused {type(exc).__name__}: {exc}".replace("\n", " ")[:3000])
        os._exit(3)
    say(f"bus {state.bus.bus_id:016x}")
    ids = sorted(int(k) for k in state.pages.keys())
    while len(ids) < pages:
        ids.append(mmsb.create_page(state, size=64).id)
    say(f"open {state.log.last_lsn} {state.bus.replication.term}")
    i = 0
    while True:
        a, b = ids[i % len(ids)], ids[(i * 3 + 1) % len(ids)]
        tag = hashlib.sha256(f"{round_no}:{i}".encode()).digest()[:16]
        with mmsb.batch(state):
            mmsb.write_page(state, a, 0, tag)
            if b != a:
                mmsb.write_page(state, b, 16, tag)
        lsn = state.log.last_lsn
        page = mmsb.query_page(state, a)
        say(f"ack {lsn} {a} {hashlib.sha1(page, usedforsecurity=False).hexdigest()}")
        i += 1


def main(argv: list[str]) -> int:
    url, ack, pages = argv[0], argv[1], int(argv[2])
    import mmsb  # noqa: F401 - imported once, before any fork

    warm(max_tlog_size=MAX_TLOG)  # the leader's durable paths (not its replication's)
    return serve(lambda args: write_loop(url, ack, pages, args[0], int(args[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
