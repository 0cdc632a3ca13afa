"""Several processes on one bus: two writers that share it, and a reader that follows it.

Run it with ``python examples/processes.py``. It starts two writer processes on a bus in
a temporary folder (``mmsb_start(path=..., shared=True)``); each adds to a counter page
the other also writes, so every increment must see the other's. This process attaches
as a reader (``mmsb.attach``), follows the change feed while they work, and checks at
the end that no increment was lost.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import mmsb

WRITER = textwrap.dedent("""
    import sys
    import mmsb

    path, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    state = mmsb.mmsb_start(path=path, shared=True)
    for _ in range(rounds):
        with mmsb.batch(state) as b:          # one call: read, add one, write back
            count = int.from_bytes(mmsb.query_page(state, 1)[:8], "little")
            b.write(1, 0, (count + 1).to_bytes(8, "little"))
    mmsb.mmsb_stop(state)
    print(name, "done")
""")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bus"
        state = mmsb.mmsb_start(path=path, shared=True)
        counter = mmsb.create_page(state, 8)           # page 1: the shared counter
        mmsb.mmsb_stop(state)

        reader = mmsb.attach(path)
        start = reader.last_lsn
        rounds = 200
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(rounds)])  # noqa: S603
                   for name in ("left", "right")]
        changes = 0
        for event in reader.changes(since=start, follow=True, timeout=5.0):
            if event.type == mmsb.EventType.PAGE_CHANGED and event.page_id == counter.id:
                changes += 1
                if changes == 2 * rounds:
                    break
        for w in writers:
            w.wait(timeout=60)
        total = int.from_bytes(reader.read_page(counter.id)[:8], "little")
        print(f"followed {changes} changes of the counter; it reads {total}")
        assert total == 2 * rounds, "an increment was lost"
        snap = reader.snapshot()
        print(f"snapshot at LSN {snap.lsn}: pages {sorted(snap.pages)}")
        reader.close()


if __name__ == "__main__":
    main()
