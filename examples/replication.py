"""A bus replicated through Redis: a leader, two followers, a failover.

Run it with ``python examples/replication.py`` on a machine with Debian's
``redis-server`` (``apt-get install redis-server``) and ``pip install 'mmsb[replicate]'``.
It starts its own Redis on a free localhost port in a temporary folder, then:

1. opens a leader bus that acknowledges a write only once a follower has it
   (``ack="replicas:1"``), and two followers, each with its own directory;
2. writes, and reads the same pages back from the followers (and their lag);
3. stops the leader and promotes a follower: it takes the next term, writes, and the
   other follower follows the new leader without being told.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mmsb


def start_redis(folder: Path, server: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(  # noqa: S603 - the server found on PATH, fixed arguments
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
        stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    server = shutil.which("redis-server")
    if server is None:
        print("this example needs redis-server (apt-get install redis-server)")
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        redis_proc, url = start_redis(root / "redis", server)
        try:
            run(root, url)
        finally:
            redis_proc.terminate()
            redis_proc.wait()


def run(root: Path, url: str) -> None:
    cfg = mmsb.MMSBConfig(replicate_to=url, ack="replicas:1", ack_timeout=10)
    leader = mmsb.mmsb_start(path=root / "leader", config=cfg)
    bus_id = leader.bus_id                        # 16 hex digits: what followers name
    print(f"leader of bus {bus_id}")

    # Each follower keeps a durable copy in its own directory (on another machine, it
    # would need only the Redis URL and the bus id).
    a = mmsb.follow(url, bus_id, root / "follower-a", node="a",
                    config=mmsb.MMSBConfig(ack="replicas:1"))
    b = mmsb.follow(url, bus_id, root / "follower-b", node="b")

    page = mmsb.create_page(leader, 32)           # returns once a follower has it
    for i in range(1, 6):
        mmsb.write_page(leader, page.id, 0, f"step {i}".encode())
    last = leader.log.last_lsn
    for f in (a, b):
        assert f.wait_for(last, timeout=10)
        print(f"follower {f.node}: {f.read_page(page.id)[:6]!r}, lag {f.lag.lsns} LSNs")
    print("follower a, as of LSN 3:", a.read_page_at(page.id, lsn=3)[:6])

    # Failover: the leader goes away (here it stops and gives its lease back; after a
    # crash the followers wait for the lease to lapse, or promote with force=True).
    mmsb.mmsb_stop(leader)
    new = a.promote()
    print(f"follower a leads now, term {a.term}")
    mmsb.write_page(new, page.id, 0, b"after!")     # acknowledged by follower b
    assert b.wait_for(new.log.last_lsn, timeout=10)
    print(f"follower b follows the new leader: {b.read_page(page.id)[:6]!r}")
    try:
        mmsb.write_page(b.state, page.id, 0, b"nope")
    except mmsb.NotLeaderError as exc:
        print("follower b refuses writes:", type(exc).__name__)
    b.close()
    a.close()
    mmsb.mmsb_stop(new)


if __name__ == "__main__":
    main()
