"""Replication through Redis: a leader bus, followers, acknowledgements, failover.

Every test runs against a real ``redis-server`` (Debian's package) started on a free
localhost port in a temporary directory, with AOF on, and stopped after; where the
binary is absent the tests skip with that reason.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mmsb
from conftest import assert_unchanged, snapshot
from mmsb._history.timetravel import read_page_at
from mmsb._replication.wire import (
    Keys,
    decode_entry,
    decode_manifest,
    encode_entry,
    read_role,
)
from mmsb._storage.codec import encode_record
from mmsb._storage.wal import frame

redis = pytest.importorskip("redis", reason="redis-py is not installed (the test extra has it)")
REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="no redis-server on PATH "
                                "(apt-get install redis-server)")
WRITER = Path(__file__).with_name("repl_writer.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own, AOF fsynced at every write."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> Any:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


def _leader(path: Path, url: str, **cfg: Any) -> mmsb.MMSBState:
    cfg.setdefault("enable_gpu", False)
    return mmsb.mmsb_start(path=path, config=mmsb.MMSBConfig(replicate_to=url, **cfg))


def _pages(state: mmsb.MMSBState) -> dict[int, tuple[bytes, int]]:
    with state.lock:
        return {int(p): (mmsb.query_page(state, int(p)), int(state.pages[int(p)].epoch))
                for p in state.pages.keys()}


def _random_call(state: mmsb.MMSBState, rng: random.Random, ids: list[int]) -> None:
    op = rng.random()
    if op < 0.08 or len(ids) < 3:
        ids.append(mmsb.create_page(state, size=rng.choice([16, 64, 300])).id)
    elif op < 0.12 and len(ids) > 4:
        pid = ids.pop(rng.randrange(len(ids)))
        mmsb.delete_page(state, pid)
    elif op < 0.16:
        pid = rng.choice(ids)
        mmsb.resize_page(state, pid, rng.choice([16, 64, 300]))
    elif op < 0.30:
        with mmsb.batch(state):
            for _ in range(rng.randint(2, 6)):
                pid = rng.choice(ids)
                size = int(state.pages[pid].size)
                mmsb.write_page(state, pid, rng.randrange(size), bytes([rng.randrange(256)]))
    elif op < 0.36:
        pid = rng.choice(ids)
        mmsb.set_metadata(state, pid, "k", rng.randrange(100))
    else:
        pid = rng.choice(ids)
        size = int(state.pages[pid].size)
        n = rng.randint(1, min(size, 24))
        mmsb.write_page(state, pid, rng.randrange(size - n + 1), rng.randbytes(n))


def _follower_matches_leader_history(f: mmsb.Follower, leader: mmsb.MMSBState) -> int:
    """The follower's pages at the LSN it reports equal the leader's pages at that LSN."""
    with f.lock:
        state = f.state
        with state.lock:
            lsn = state.log.last_lsn
            mine = _pages(state)
    with leader.lock:
        for pid, (data, _epoch) in mine.items():
            assert read_page_at(leader, pid, lsn=lsn) == data, (pid, lsn)
    return lsn


# -- the happy path ------------------------------------------------------------------------

def test_leader_and_three_followers_agree_at_every_reported_lsn(server: RedisServer,
                                                                 tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url, max_tlog_size=400)
    bus_id = leader.bus.bus_id
    followers = [mmsb.follow(server.url, bus_id, tmp_path / f"f{i}") for i in range(3)]
    try:
        rng = random.Random(7)
        ids: list[int] = []
        checked = set()
        for step in range(1500):
            _random_call(leader, rng, ids)
            if step % 100 == 99:
                for f in followers:
                    checked.add(_follower_matches_leader_history(f, leader))
        last = leader.log.last_lsn
        for f in followers:
            assert f.wait_for(last, 30), (f.applied_lsn, last, f.error)
            assert _pages(f.state) == _pages(leader)
            assert f.state.log.last_lsn == last
            assert f.error is None
            # The follower's own log replays to the same pages.
            replayed = mmsb.replay_to_lsn(f.state, last)
            assert _pages(replayed) == _pages(leader)
            lag = f.lag
            assert lag.lsns == 0 and lag.seconds == 0.0 and lag.leader_lsn == last
        assert len(checked) > 3
        # Readers of a follower's directory in the mmsb.attach way see the same pages.
        with followers[0].reader() as reader:
            assert reader.last_lsn == last
            for pid, (data, _e) in _pages(leader).items():
                assert reader.read_page(pid) == data
        events = list(followers[1].changes(last - 20))
        assert [e.lsn for e in events][-1] == last
    finally:
        for f in followers:
            f.close()
        mmsb.mmsb_stop(leader)


def test_follower_resumes_after_restart_without_a_new_bootstrap(server: RedisServer,
                                                                tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    f = mmsb.follow(server.url, leader.bus.bus_id, tmp_path / "f")
    try:
        pid = mmsb.create_page(leader, size=32).id
        for i in range(50):
            mmsb.write_page(leader, pid, 0, i.to_bytes(4, "little"))
        assert f.wait_for(leader.log.last_lsn, 20)
        applied = f.applied_lsn
        for bad_lsn, bad_timeout in ((-1, 1), ("3", 1), (True, 1), (1, float("nan")), (1, -1),
                                     (1, "1")):
            with pytest.raises(mmsb.InvalidArgumentError):
                f.wait_for(bad_lsn, bad_timeout)  # type: ignore[arg-type]
        assert f.applied_lsn == applied
        node = f.node
        f.close()
        for i in range(50, 80):
            mmsb.write_page(leader, pid, 0, i.to_bytes(4, "little"))
        f = mmsb.follow(server.url, leader.bus.bus_id, tmp_path / "f")
        assert f.node == node
        assert f.wait_for(leader.log.last_lsn, 20)
        assert f.stats["bootstraps"] == 0
        assert f.read_page(pid) == mmsb.query_page(leader, pid)
        assert f.read_page_at(pid, lsn=10) == read_page_at(leader, pid, lsn=10)
    finally:
        f.close()
        mmsb.mmsb_stop(leader)


def test_acknowledged_writes_wait_for_followers_and_time_out_without_them(
        server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url, ack="replicas:2", ack_timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(mmsb.DurabilityError, match="0 of the 2 followers"):
            mmsb.create_page(leader, size=8)
        assert time.monotonic() - t0 >= 0.3
        # The write stays: it is in the leader's log and applied.
        assert len(leader.pages) == 1 and leader.log.last_lsn >= 1
        fs = [mmsb.follow(server.url, leader.bus.bus_id, tmp_path / f"f{i}") for i in range(2)]
        try:
            leader.config.ack_timeout = 20
            pid = int(next(iter(leader.pages.keys())))
            for i in range(20):
                mmsb.write_page(leader, pid, 0, bytes([i + 1]))
                lsn = leader.log.last_lsn
                # Returned: both followers have it durably (their own logs hold it).
                for f in fs:
                    assert f.applied_lsn >= lsn
        finally:
            for f in fs:
                f.close()
    finally:
        mmsb.mmsb_stop(leader)


# -- refusals ------------------------------------------------------------------------------

def test_writes_to_a_follower_are_refused_and_change_nothing(server: RedisServer,
                                                             tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    f = mmsb.follow(server.url, leader.bus.bus_id, tmp_path / "f")
    try:
        pid = mmsb.create_page(leader, size=16).id
        mmsb.write_page(leader, pid, 0, b"abc")
        assert f.wait_for(leader.log.last_lsn, 20)
        with f.lock:
            before = snapshot(f.state)
            for call in (lambda s: mmsb.write_page(s, pid, 0, b"zz"),
                         lambda s: mmsb.create_page(s, size=8),
                         lambda s: mmsb.delete_page(s, pid),
                         lambda s: mmsb.set_metadata(s, pid, "a", 1)):
                with pytest.raises(mmsb.NotLeaderError, match="follower"):
                    call(f.state)
                assert_unchanged(f.state, before)
    finally:
        f.close()
        mmsb.mmsb_stop(leader)


def test_bad_settings_are_refused(server: RedisServer, tmp_path: Path) -> None:
    for bad in ({"replicate_to": "http://x"}, {"replicate_to": 5}, {"ack": "all"},
                {"ack": "replicas:0"}, {"ack": "replicas:65"}, {"ack_timeout": 0},
                {"replication_lease": 0.01}):
        with pytest.raises(mmsb.InvalidArgumentError):
            mmsb.MMSBConfig(**bad).validate()
    with pytest.raises(mmsb.InvalidArgumentError, match="exclusive"):
        mmsb.mmsb_start(path=tmp_path / "s", shared=True,
                        config=mmsb.MMSBConfig(replicate_to=server.url))
    with pytest.raises(mmsb.InvalidArgumentError, match="durable bus"):
        mmsb.mmsb_start(config=mmsb.MMSBConfig(replicate_to=server.url))
    for bus in ("xyz", 0, -1, 1 << 64, True):
        with pytest.raises(mmsb.InvalidArgumentError):
            mmsb.follow(server.url, bus, tmp_path / "f")
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.follow(server.url, 5, tmp_path / "f", node="bad name!")
    with pytest.raises(mmsb.ReplicationError, match="cannot reach Redis"):
        mmsb.follow(f"redis://127.0.0.1:{_free_port()}/0", 5, tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_unreachable_redis_refuses_the_leader_and_leaves_the_bus_as_it_was(
        tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    state = mmsb.mmsb_start(path=tmp_path / "b", config=mmsb.MMSBConfig(enable_gpu=False))
    mmsb.create_page(state, size=8)
    mmsb.mmsb_stop(state)
    def files() -> dict[str, bytes]:
        return {str(p.relative_to(tmp_path)): p.read_bytes()
                for p in sorted((tmp_path / "b").rglob("*")) if p.is_file()
                and p.parent.name != "map"}

    before = files()
    with pytest.raises(mmsb.ReplicationError, match="cannot reach Redis"):
        _leader(tmp_path / "b", url)
    assert not (tmp_path / "b" / "REPL").exists()
    assert files() == before
    reopened = mmsb.mmsb_start(path=tmp_path / "b", config=mmsb.MMSBConfig(enable_gpu=False))
    assert len(reopened.pages) == 1
    mmsb.mmsb_stop(reopened)


def test_a_follower_directory_cannot_be_opened_as_leader_and_a_deposed_leader_is_refused(
        server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url, replication_lease=0.5)
    bus_id = leader.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    mmsb.create_page(leader, size=8)
    assert f.wait_for(leader.log.last_lsn, 20)
    f.close()
    with pytest.raises(mmsb.ReplicationError, match="follower's copy"):
        _leader(tmp_path / "f", server.url)
    mmsb.mmsb_stop(leader)
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    assert f.wait_for(1, 20)
    promoted = f.promote()
    f.close()
    # The old leader's directory while the new leader's lease holds: refused.
    with pytest.raises(mmsb.ReplicationError, match="led by another node"):
        _leader(tmp_path / "lead", server.url)
    mmsb.mmsb_stop(promoted)  # gives the lease back
    # And after: a newer term superseded it; it may only rejoin as a follower.
    with pytest.raises(mmsb.ReplicationError, match="newer than this directory"):
        _leader(tmp_path / "lead", server.url)
    back = mmsb.follow(server.url, bus_id, tmp_path / "lead")
    assert back.wait_for(1, 20)
    back.close()


# -- failover ------------------------------------------------------------------------------

def test_promotion_fences_the_old_leader_and_it_rejoins_as_a_follower(
        server: RedisServer, tmp_path: Path) -> None:
    old = _leader(tmp_path / "a", server.url, replication_lease=30)
    bus_id = old.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "b")
    pid = mmsb.create_page(old, size=16).id
    mmsb.write_page(old, pid, 0, b"one")
    assert f.wait_for(old.log.last_lsn, 20)
    with pytest.raises(mmsb.ReplicationError, match="lease"):
        f.promote()
    new = f.promote(force=True)
    try:
        assert new.bus.replication.term == 2
        mmsb.write_page(new, pid, 0, b"two")
        # The old leader learns of the new term at its next shipment or lease renewal:
        # from then on its writes are refused, and none reaches the stream.
        deadline = time.monotonic() + 20
        n = 0
        while True:
            n += 1
            try:
                mmsb.write_page(old, pid, 8, n.to_bytes(4, "little"))
            except mmsb.NotLeaderError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = snapshot(old)
        with pytest.raises(mmsb.NotLeaderError, match="no longer the leader"):
            mmsb.write_page(old, pid, 0, b"x")
        assert_unchanged(old, before)
        mmsb.mmsb_stop(old)
        keys = Keys(bus_id)
        c = server.client()
        for _id, fields in c.xrange(keys.log(1)):
            assert decode_entry(fields[b"f"]).term == 1
        c.close()
        # The old directory rejoins as a follower: what it wrote after the new term
        # began is replaced (by a bootstrap) with the new leader's history.
        back = mmsb.follow(server.url, bus_id, tmp_path / "a")
        try:
            assert back.wait_for(new.log.last_lsn, 20), back.error
            assert _pages(back.state) == _pages(new)
            assert back.stats["bootstraps"] == 1
            assert read_role(tmp_path / "a").term == 2
        finally:
            back.close()
    finally:
        f.close()
        mmsb.mmsb_stop(new)


def test_promote_command_hands_over_to_the_most_advanced_follower(
        server: RedisServer, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mmsb.cli import main

    leader = _leader(tmp_path / "lead", server.url, replication_lease=0.5)
    bus_id = leader.bus.bus_id
    promoted: list[mmsb.MMSBState] = []
    fs = [mmsb.follow(server.url, bus_id, tmp_path / f"f{i}", node=f"n{i}",
                      on_promote=promoted.append) for i in range(2)]
    try:
        pid = mmsb.create_page(leader, size=8).id
        for i in range(10):
            mmsb.write_page(leader, pid, 0, bytes([i + 1]))
        for f in fs:
            assert f.wait_for(leader.log.last_lsn, 20)
        last = leader.log.last_lsn
        mmsb.mmsb_stop(leader)  # gives the lease back
        result = CliRunner().invoke(main, ["promote", "--best", "--url", server.url, "--bus",
                                           f"{bus_id:016x}", "--timeout", "20"])
        assert result.exit_code == 0, result.output
        assert "term 2" in result.output
        # The command returns once the new term is in Redis; the follower hands the new
        # leader to on_promote once it has started shipping, a moment later.
        deadline = time.monotonic() + 20
        while not promoted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(promoted) == 1
        new = promoted[0]
        assert new.log.last_lsn == last and mmsb.query_page(new, pid)[0] == 10
        other = fs[1] if promoted[0] is fs[0].state else fs[0]
        mmsb.write_page(new, pid, 0, b"\x63")
        assert other.wait_for(new.log.last_lsn, 20)
        assert other.read_page(pid)[0] == 0x63
        mmsb.mmsb_stop(new)
    finally:
        for f in fs:
            f.close()


def test_automatic_promotion_when_the_lease_lapses(server: RedisServer, tmp_path: Path) -> None:
    proc = _writer(server.url, "replicas:1", 3)
    try:
        proc.go(tmp_path / "lead", 1)
        bus_id = int(proc.expect("bus").split()[1], 16)
        got: list[mmsb.MMSBState] = []
        f = mmsb.follow(server.url, bus_id, tmp_path / "f", auto_promote=True,
                        on_promote=got.append,
                        config=mmsb.MMSBConfig(replication_lease=0.5, enable_gpu=False))
        proc.expect("open")
        acks = proc.acks(20)
        acks += proc.kill()
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline, f.error
            time.sleep(0.05)
        new = got[0]
        assert new.bus.replication.term == 2
        _check_acked(new, acks)
        mmsb.mmsb_stop(new)
        f.close()
    finally:
        proc.quit()


# -- faults --------------------------------------------------------------------------------

class _Writer:
    """tests/repl_writer.py in fork-server mode."""

    def __init__(self, url: str, ack: str, pages: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WRITER), url, ack, str(pages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = b""
        assert self.line(60) == "ready"

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the writer process said nothing in time")
            poller = select.poll()  # not select(): the suite may hold descriptors past 1024
            poller.register(fd, select.POLLIN)
            if poller.poll(left * 1000):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError("the writer process ended")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def go(self, directory: Path, round_no: int) -> None:
        self.send(f"go {directory} {round_no}")
        assert self.line(30).startswith("child")

    def expect(self, word: str) -> str:
        line = self.line(60)
        assert line.startswith(word), line
        return line

    def acks(self, n: int) -> list[tuple[int, int, str]]:
        out = []
        while len(out) < n:
            parts = self.line(60).split()
            assert parts[0] == "ack", parts
            out.append((int(parts[1]), int(parts[2]), parts[3]))
        return out

    def kill(self) -> list[tuple[int, int, str]]:
        """SIGKILL the child; every ack it printed before it died."""
        self.send("kill")
        out = []
        while True:
            parts = self.line(30).split()
            if parts[0] == "dead":
                return out
            if parts[0] == "ack":
                out.append((int(parts[1]), int(parts[2]), parts[3]))

    def quit(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _writer(url: str, ack: str, pages: int) -> _Writer:
    return _Writer(url, ack, pages)


def _check_acked(state: mmsb.MMSBState, acked: list[tuple[int, int, str]]) -> None:
    """Every acknowledged call is in ``state``'s history, with the page as it was."""
    with state.lock:
        assert state.log.last_lsn >= max(a[0] for a in acked)
        for lsn, pid, digest in acked:
            page = read_page_at(state, pid, lsn=lsn)
            assert hashlib.sha1(page, usedforsecurity=False).hexdigest() == digest, (lsn, pid)


def _no_torn_batch(state: mmsb.MMSBState) -> None:
    """Each writer call is a batch: a tag at offset 0 of page a, then the same tag at
    offset 16 of page b. The newest record must end a call (write b), never sit in the
    middle of one (only write a)."""
    with state.lock:
        last = state.log.last_lsn
        rec = next(state.log.iter_records(last - 1, last))
        pid = rec.page_id
        now, before = read_page_at(state, pid, lsn=last), read_page_at(state, pid, lsn=last - 1)
        changed = [i for i in range(len(now)) if now[i] != before[i]]
        assert changed and min(changed) >= 16, (last, pid, changed)
        tag = now[16:32]
        assert any(mmsb.query_page(state, int(p))[0:16] == tag for p in state.pages.keys())


@pytest.mark.slow
def test_no_acknowledged_write_is_lost_over_fifty_leader_kills(server: RedisServer,
                                                               tmp_path: Path) -> None:
    """Two directories take turns: the leader (a process) is killed with SIGKILL at a
    random moment, the follower (this process) is promoted, checked against every
    acknowledged write, stopped, and reopened as the next leader's process while the
    killed one's directory rejoins as a follower."""
    rng = random.Random(11)
    dirs = [tmp_path / "a", tmp_path / "b"]
    proc = _writer(server.url, "replicas:1", 4)
    cfg = mmsb.MMSBConfig(enable_gpu=False, replication_lease=1.0, max_tlog_size=300)
    follower: mmsb.Follower | None = None
    bus_id: int | None = None
    acked_all: list[tuple[int, int, str]] = []
    try:
        for round_no in range(50):
            lead, copy = dirs[round_no % 2], dirs[(round_no + 1) % 2]
            if bus_id is not None:
                follower = mmsb.follow(server.url, bus_id, copy, config=cfg)
            proc.go(lead, round_no)
            line = proc.line(60)
            assert line.startswith("bus"), line
            if bus_id is None:
                bus_id = int(line.split()[1], 16)
                follower = mmsb.follow(server.url, bus_id, copy, config=cfg)
            proc.expect("open")
            assert follower is not None
            acked = proc.acks(rng.randint(1, 12))
            time.sleep(rng.random() * 0.05)
            acked += proc.kill()
            acked_all += acked
            new = follower.promote(force=True)
            _check_acked(new, acked)
            _no_torn_batch(new)
            follower.close()
            follower = None
            mmsb.mmsb_stop(new)
        # The last leader's directory holds every acknowledged write of every round.
        final = mmsb.open_readonly(dirs[1])
        _check_acked(final, acked_all)
    finally:
        if follower is not None:
            follower.close()
        proc.quit()


def test_redis_stopped_for_a_while_and_restarted(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis")
    leader = _leader(tmp_path / "lead", srv.url)
    f = mmsb.follow(srv.url, leader.bus.bus_id, tmp_path / "f")
    try:
        pid = mmsb.create_page(leader, size=64).id
        for i in range(50):
            mmsb.write_page(leader, pid, i % 60, b"\x01\x02")
        assert f.wait_for(leader.log.last_lsn, 20)
        srv.stop()
        # The leader goes on (ack="local"); its frames wait for the server.
        for i in range(300):
            mmsb.write_page(leader, pid, i % 60, bytes([i % 256, 9]))
        time.sleep(2.0)
        assert f.applied_lsn < leader.log.last_lsn
        srv.start()
        assert f.wait_for(leader.log.last_lsn, 30), (f.applied_lsn, leader.log.last_lsn)
        assert _pages(f.state) == _pages(leader)
        assert f.error is None
    finally:
        f.close()
        mmsb.mmsb_stop(leader)
        srv.stop()


def test_killed_follower_process_resumes(server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    bus_id = leader.bus.bus_id
    script = ("import mmsb, sys, time\n"
              f"f = mmsb.follow({server.url!r}, {bus_id}, {str(tmp_path / 'f')!r})\n"
              "print('up', flush=True)\n"
              "time.sleep(600)\n")
    try:
        pid = mmsb.create_page(leader, size=32).id
        for round_no in range(3):
            p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
            assert p.stdout is not None and p.stdout.readline().strip() == b"up"
            for i in range(100):
                mmsb.write_page(leader, pid, i % 28, bytes([round_no, i % 256, 1, 2]))
            time.sleep(random.random() * 0.3)
            p.kill()
            p.wait()
        f = mmsb.follow(server.url, bus_id, tmp_path / "f")
        try:
            assert f.wait_for(leader.log.last_lsn, 30)
            assert _pages(f.state) == _pages(leader)
            assert f.stats["bootstraps"] == 0
        finally:
            f.close()
    finally:
        mmsb.mmsb_stop(leader)


def test_a_follower_trimmed_past_bootstraps_again(server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url, max_tlog_size=100)
    bus_id = leader.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    try:
        pid = mmsb.create_page(leader, size=32).id
        mmsb.write_page(leader, pid, 0, b"first")
        assert f.wait_for(leader.log.last_lsn, 20)
        f.close()
        # Several checkpoints: the stream is trimmed behind the oldest still published.
        for i in range(1000):
            mmsb.write_page(leader, pid, i % 24, bytes([i % 256, 1, 2, 3]))
        keys = Keys(bus_id)
        c = server.client()
        deadline = time.monotonic() + 20
        while True:
            # (The leader publishes a checkpoint's manifest, then trims the older ones:
            # while its uploads go on, a third manifest can stand for a moment.)
            first = c.xrange(keys.log(leader.bus.replication.term), count=1)
            if first and int(first[0][0].split(b"-")[0]) > 10 and c.zcard(keys.ckpts) <= 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.close()
        f = mmsb.follow(server.url, bus_id, tmp_path / "f")
        assert f.wait_for(leader.log.last_lsn, 30), f.error
        assert f.stats["bootstraps"] == 1
        assert _pages(f.state) == _pages(leader)
    finally:
        f.close()
        mmsb.mmsb_stop(leader)


@pytest.mark.parametrize("damage", ["frame_byte", "header_byte", "valid_but_foreign"])
def test_a_damaged_entry_is_never_applied(server: RedisServer, tmp_path: Path,
                                          damage: str) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    bus_id = leader.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    keys = Keys(bus_id)
    c = server.client()
    try:
        pid = mmsb.create_page(leader, size=32).id
        mmsb.write_page(leader, pid, 0, b"a")
        assert f.wait_for(leader.log.last_lsn, 20)
        f.close()
        seen = leader.log.last_lsn
        for i in range(20):
            mmsb.write_page(leader, pid, 1, bytes([i + 1]))
        term = leader.bus.replication.term
        deadline = time.monotonic() + 20
        while int(c.hget(keys.head, "lsn") or 0) < leader.log.last_lsn:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Rewrite the stream with one entry damaged (stream ids cannot be reused, so
        # the whole stream is written again under the same ids).
        entries = c.xrange(keys.log(term))
        victim = next(k for k, (_id, fields) in enumerate(entries)
                      if decode_entry(fields[b"f"]).first_lsn > seen)
        bad_lsn = int(entries[victim][0].split(b"-")[0])
        c.delete(keys.log(term))
        for k, (eid, fields) in enumerate(entries):
            raw = bytearray(fields[b"f"])
            if k == victim:
                if damage == "frame_byte":
                    raw[-1] ^= 0x40
                elif damage == "header_byte":
                    raw[20] ^= 0x01
                else:
                    # Valid checksums everywhere, but the record does not follow the
                    # state (a write that builds on an epoch the page never had).
                    # An entry holds one frame per record here (single writes).
                    e = decode_entry(bytes(raw))
                    recs = [copy.copy(r) for r in
                            leader.log.iter_records(e.first_lsn - 1, e.last_lsn)]
                    recs[0].base_epoch += 5
                    raw = bytearray(encode_entry(
                        bus_id, term, e.first_lsn, e.last_lsn,
                        b"".join(frame(encode_record(r)) for r in recs)))
            c.xadd(keys.log(term), {"f": bytes(raw)}, id=eid)
        f = mmsb.follow(server.url, bus_id, tmp_path / "f")
        # It cannot pass the damaged entry from the stream: it asks for a checkpoint,
        # the leader publishes one, and it bootstraps past the damage.
        assert f.wait_for(leader.log.last_lsn, 30), (f.applied_lsn, bad_lsn, f.error)
        assert f.stats["bootstraps"] >= 1 and f.stats["repairs"] >= 1
        assert _pages(f.state) == _pages(leader)
        assert f.error is None
    finally:
        f.close()
        c.close()
        mmsb.mmsb_stop(leader)


def test_formats_refuse_damage() -> None:
    raw = encode_entry(5, 2, 10, 12, frame(b"\x00" * 20))
    e = decode_entry(raw)
    assert (e.bus_id, e.term, e.first_lsn, e.last_lsn) == (5, 2, 10, 12)
    for i in range(48):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(mmsb.SerializationError):
            decode_entry(bytes(bad))
    with pytest.raises(mmsb.SerializationError):
        decode_entry(raw[:47])
    from mmsb._replication.wire import Manifest, encode_manifest

    m = encode_manifest(Manifest(5, 2, 100, 99, 10, 1, 7))
    assert decode_manifest(m).lsn == 100
    for i in range(len(m)):
        bad = bytearray(m)
        bad[i] ^= 0x01
        with pytest.raises(mmsb.SerializationError):
            decode_manifest(bytes(bad))


def test_a_leader_whose_log_lost_what_it_shipped_is_refused(server: RedisServer,
                                                             tmp_path: Path) -> None:
    """A leader that comes back with less of its own term than the stream holds (its
    disk lost a tail the followers may have acknowledged) must not lead again: that
    would roll the followers back."""
    leader = _leader(tmp_path / "lead", server.url)
    bus_id = leader.bus.bus_id
    pid = mmsb.create_page(leader, size=16).id
    mmsb.write_page(leader, pid, 0, b"kept")
    shutil.copytree(tmp_path / "lead", tmp_path / "image", ignore=shutil.ignore_patterns("LOCK"))
    for i in range(5):
        mmsb.write_page(leader, pid, 4, bytes([i + 1]))
    mmsb.mmsb_stop(leader)
    shutil.rmtree(tmp_path / "lead")
    shutil.copytree(tmp_path / "image", tmp_path / "lead")
    with pytest.raises(mmsb.ReplicationError, match="followers may have acknowledged"):
        _leader(tmp_path / "lead", server.url)
    # A follower that has the whole stream takes over instead.
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    try:
        assert f.wait_for(7, 20)
        new = f.promote()
        assert mmsb.query_page(new, pid)[:5] == b"kept\x05"
        mmsb.mmsb_stop(new)
    finally:
        f.close()


def test_a_call_waiting_for_acknowledgements_does_not_hold_up_the_others(
        server: RedisServer, tmp_path: Path) -> None:
    import threading

    leader = _leader(tmp_path / "lead", server.url, ack="replicas:1", ack_timeout=3)
    try:
        with pytest.raises(mmsb.DurabilityError):
            pid = mmsb.create_page(leader, size=8).id
        pid = int(next(iter(leader.pages.keys())))
        errors: list[BaseException] = []

        def write() -> None:
            try:
                mmsb.write_page(leader, pid, 0, b"\x07")
            except mmsb.DurabilityError as exc:
                errors.append(exc)

        t = threading.Thread(target=write)
        t.start()
        while leader.log.last_lsn < 2:
            time.sleep(0.001)
        # The writer waits for its acknowledgement without the state's lock.
        assert mmsb.query_page(leader, pid)[0] == 7
        mmsb.write_page(leader, pid, 0, b"\x07")  # changes nothing, logs nothing: no wait
        # The waiting call gives up only after ack_timeout (3 s): it is still waiting.
        assert t.is_alive(), "the other calls waited for the acknowledgement"
        t.join()
        assert len(errors) == 1 and "0 of the 1 followers" in str(errors[0])
    finally:
        mmsb.mmsb_stop(leader)


def test_a_damaged_published_checkpoint_is_refused_and_another_one_used(
        server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    bus_id = leader.bus.bus_id
    keys = Keys(bus_id)
    c = server.client()
    try:
        pid = mmsb.create_page(leader, size=16).id
        mmsb.write_page(leader, pid, 0, b"abc")
        deadline = time.monotonic() + 20
        while not c.zcard(keys.ckpts):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Every published checkpoint's first chunk: a flipped byte (its manifest's CRC
        # no longer matches), or a valid CRC over bytes that are not a checkpoint.
        for k, raw in enumerate(c.zrange(keys.ckpts, 0, -1)):
            man = decode_manifest(raw)
            data = bytearray(c.get(keys.chunk(man, 0)))
            if k % 2 == 0:
                data[100] ^= 0xFF
                c.set(keys.chunk(man, 0), bytes(data))
            else:
                from mmsb._replication.wire import Manifest, encode_manifest
                from mmsb._storage.codec import crc32c

                junk = b"MMSBCKPT" + bytes(len(data) - 8)
                c.set(keys.chunk(man, 0), junk)
                fake = Manifest(man.bus_id, man.term, man.lsn, man.nonce, len(junk), 1,
                                crc32c(junk))
                c.zrem(keys.ckpts, raw)
                c.zadd(keys.ckpts, {encode_manifest(fake): man.lsn})
        f = mmsb.follow(server.url, bus_id, tmp_path / "f")
        try:
            # It refuses them, asks the leader for a fresh one, and bootstraps from it.
            assert f.wait_for(leader.log.last_lsn, 30), f.error
            assert f.read_page(pid)[:3] == b"abc"
            assert f.bad_manifests and f.error is None
        finally:
            f.close()
    finally:
        c.close()
        mmsb.mmsb_stop(leader)


def test_follow_and_promote_commands(server: RedisServer, tmp_path: Path) -> None:
    import json

    leader = _leader(tmp_path / "lead", server.url)
    bus = f"{leader.bus.bus_id:016x}"
    pid = mmsb.create_page(leader, size=8).id
    mmsb.write_page(leader, pid, 0, b"\x05")
    cmd = [sys.executable, "-m", "mmsb", "follow", server.url, bus, str(tmp_path / "f"),
           "--node", "cli1", "--every", "0.2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "as node cli1" in proc.stdout.readline()
        last = leader.log.last_lsn
        while True:
            status = json.loads(proc.stdout.readline())
            if status["applied_lsn"] == last:
                break
        assert status["lag_lsns"] == 0 and status["term"] == 1
        mmsb.mmsb_stop(leader)
        # The directory names its bus, node and Redis: the running follower is asked.
        done = subprocess.run([sys.executable, "-m", "mmsb", "promote", str(tmp_path / "f"),
                               "--timeout", "20"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "led by cli1" in done.stdout
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "now leads bus" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The promoted directory opens as the leader of the next term.
    new = _leader(tmp_path / "f", server.url)
    try:
        assert new.bus.replication.term == 3 and mmsb.query_page(new, pid)[0] == 5
        mmsb.write_page(new, pid, 0, b"\x06")
    finally:
        mmsb.mmsb_stop(new)
    # A stopped follower's directory is promoted in place by --path.
    f = mmsb.follow(server.url, int(bus, 16), tmp_path / "g")
    new = _leader(tmp_path / "f", server.url)
    mmsb.write_page(new, pid, 0, b"\x07")
    assert f.wait_for(new.log.last_lsn, 20)
    f.close()
    mmsb.mmsb_stop(new)
    # A stopped follower's directory is promoted in place.
    done = subprocess.run([sys.executable, "-m", "mmsb", "promote", str(tmp_path / "g"),
                           "--timeout", "20"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "now leads bus" in done.stdout
    role = read_role(tmp_path / "g")
    assert role is not None and role.role == 1 and role.url == server.url
    # Refusals name the problem.
    for args, says in ((["promote", "--best", "--url", server.url, "--bus", "zz"], "bus id"),
                       (["promote", str(tmp_path / "g")], "leads term"),
                       (["promote", str(tmp_path / "nothing")], "no MMSB bus"),
                       (["promote"], "give a follower's PATH")):
        bad = subprocess.run([sys.executable, "-m", "mmsb", *args], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0 and says in bad.stderr, (args, bad.stderr)


def test_frames_dropped_while_redis_was_away_are_crossed_by_a_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsb._replication import leader as leader_mod

    monkeypatch.setattr(leader_mod, "_QUEUE_LIMIT", 16 << 10)
    srv = RedisServer(tmp_path / "redis")
    leader = _leader(tmp_path / "lead", srv.url)
    f = mmsb.follow(srv.url, leader.bus.bus_id, tmp_path / "f")
    try:
        pid = mmsb.create_page(leader, size=256).id
        mmsb.write_page(leader, pid, 0, b"\x01" * 8)
        assert f.wait_for(leader.log.last_lsn, 20)
        srv.stop()
        # More than the shipper may hold: what it held is dropped, and it remembers that
        # the stream now has a gap.
        for i in range(600):
            mmsb.write_page(leader, pid, i % 200, bytes([i % 251 + 1]) * 40)
        repl = leader.bus.replication
        assert repl.queued_bytes <= (16 << 10) and repl.gap
        srv.start()
        assert f.wait_for(leader.log.last_lsn, 30), (f.applied_lsn, leader.log.last_lsn)
        assert _pages(f.state) == _pages(leader)
        assert f.stats["bootstraps"] >= 2 and f.error is None
    finally:
        f.close()
        mmsb.mmsb_stop(leader)
        srv.stop()


def test_a_follower_whose_disk_refuses_keeps_trying_and_catches_up(
        server: RedisServer, tmp_path: Path) -> None:
    import errno
    import threading

    from mmsb._storage import fsops

    leader = _leader(tmp_path / "lead", server.url)
    f = mmsb.follow(server.url, leader.bus.bus_id, tmp_path / "f")
    full = threading.Event()
    refused = []
    wal = str(tmp_path / "f" / "wal")

    def hook(step: str, path: str) -> None:
        if full.is_set() and step == "write" and path.startswith(wal):
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)

    previous = fsops.set_fault_hook(hook)
    try:
        pid = mmsb.create_page(leader, size=64).id
        mmsb.write_page(leader, pid, 0, b"before")
        assert f.wait_for(leader.log.last_lsn, 20)
        full.set()
        for i in range(30):
            mmsb.write_page(leader, pid, 8, i.to_bytes(2, "little"))
        deadline = time.monotonic() + 20
        while not refused:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Nothing it could not log is applied.
        assert f.applied_lsn < leader.log.last_lsn and f.error is None
        full.clear()
        assert f.wait_for(leader.log.last_lsn, 30), f.error
        assert _pages(f.state) == _pages(leader)
    finally:
        fsops.set_fault_hook(previous)
        f.close()
        mmsb.mmsb_stop(leader)


def test_a_promotion_that_died_half_way_does_not_block_the_next(server: RedisServer,
                                                                tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url, replication_lease=0.5)
    bus_id = leader.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    pid = mmsb.create_page(leader, size=8).id
    mmsb.write_page(leader, pid, 0, b"\x01")
    assert f.wait_for(leader.log.last_lsn, 20)
    mmsb.mmsb_stop(leader)
    # Another follower fenced term 1 (term 2) and died before naming term 2's first LSN;
    # its lease lapsed.
    keys = Keys(bus_id)
    c = server.client()
    c.incr(keys.term)
    c.close()
    new = f.promote()
    try:
        assert new.bus.replication.term == 3
        mmsb.write_page(new, pid, 0, b"\x02")
        g = mmsb.follow(server.url, bus_id, tmp_path / "g")
        assert g.wait_for(new.log.last_lsn, 20)
        assert g.read_page(pid)[0] == 2
        g.close()
    finally:
        f.close()
        mmsb.mmsb_stop(new)


def test_a_follower_behind_a_finished_term_whose_stream_lost_frames_bootstraps(
        server: RedisServer, tmp_path: Path) -> None:
    leader = _leader(tmp_path / "lead", server.url)
    bus_id = leader.bus.bus_id
    f = mmsb.follow(server.url, bus_id, tmp_path / "f")
    pid = mmsb.create_page(leader, size=8).id
    assert f.wait_for(leader.log.last_lsn, 20)
    f.close()
    for i in range(10):
        mmsb.write_page(leader, pid, 0, bytes([i + 1]))
    mmsb.mmsb_stop(leader)
    c = server.client()
    c.delete(Keys(bus_id).log(1))  # term 1's stream, gone (as if trimmed)
    c.close()
    leader = _leader(tmp_path / "lead", server.url)  # term 2 begins after the last LSN
    try:
        f = mmsb.follow(server.url, bus_id, tmp_path / "f")
        try:
            assert f.wait_for(leader.log.last_lsn, 20), f.error
            assert f.read_page(pid)[0] == 10 and f.term == 2
            assert f.stats["bootstraps"] == 1 and f.stats["repairs"] == 1
        finally:
            f.close()
    finally:
        mmsb.mmsb_stop(leader)


def test_the_role_file_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    from mmsb._replication.wire import RoleFile, write_role

    role = RoleFile(2, 7, "node-1", "redis://:secret@host:6379/3")
    write_role(tmp_path, role)
    assert read_role(tmp_path) == role
    assert (tmp_path / "REPL").stat().st_mode & 0o777 == 0o600
    raw = (tmp_path / "REPL").read_bytes()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x04
        (tmp_path / "REPL").write_bytes(bytes(bad))
        with pytest.raises(mmsb.SerializationError):
            read_role(tmp_path)
    for cut in (0, 10, len(raw) - 1):
        (tmp_path / "REPL").write_bytes(raw[:cut])
        with pytest.raises(mmsb.SerializationError):
            read_role(tmp_path)
    (tmp_path / "REPL").unlink()
    (tmp_path / "REPL").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(mmsb.SerializationError):
        read_role(tmp_path)
