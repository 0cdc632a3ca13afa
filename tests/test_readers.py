"""Read-only opens beside a live writer that checkpoints every few records.

The writer (another process) keeps a counter in page 1, with a checkpoint every three
records, small segments and ``retain_checkpoints=1`` (so files are removed all the
time), and prints each value after the write returns. Each read-only open must succeed
on this healthy bus and see a counter at least as new as the last one acknowledged
before the open began.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mmsb

WRITER = r"""
import sys
import mmsb
root, retain = sys.argv[1], sys.argv[2]
cfg = mmsb.MMSBConfig(enable_gpu=False, fsync="none", max_tlog_size=3, segment_bytes=256,
                      checkpoint_interval=0, retain_checkpoints=None if retain == "all" else int(retain))
s = mmsb.mmsb_start(config=cfg, path=root)
p = mmsb.create_page(s, 64)
mmsb.create_page(s, 4096)
print("ready", flush=True)
i = 0
while True:
    i += 1
    mmsb.write_page(s, p.id, 0, i.to_bytes(8, "little"))
    if i % 5 == 0:
        mmsb.write_page(s, 2, (i * 8) % 4000, b"x" * 64)
    print(i, flush=True)
"""


def _env() -> dict[str, str]:
    src = str(Path(mmsb.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("retain", ["1", "all"])
def test_readonly_opens_beside_a_checkpointing_writer(tmp_path: Path, retain: str) -> None:
    root = tmp_path / "bus"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), retain],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    acked = [0]
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"

    def follow() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked[0] = int(line)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        opens = 0
        while (opens < 300 or acked[0] <= 50) and time.monotonic() < deadline:
            before = acked[0]
            r = mmsb.open_readonly(root)  # never an error on a healthy bus
            seen = int.from_bytes(mmsb.query_page(r, 1)[:8], "little")
            assert seen >= before, f"open {opens} saw {seen}, older than acknowledged {before}"
            opens += 1
        assert opens >= 50 and acked[0] > 50, (opens, acked[0])
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
