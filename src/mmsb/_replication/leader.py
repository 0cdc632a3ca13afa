"""The leader: a durable bus that publishes its log to Redis.

Every frame the bus appends (see ``DurableBus.append_frames``) is queued, in LSN order,
and a background thread adds it to the stream of the leader's term with a script that
first checks the term is still current, so a leader that a newer term replaced can never
add to the log. Self-contained checkpoints are published as chunked strings; the stream
is trimmed only behind the oldest checkpoint still published. With ``ack="replicas:N"``
every changing call waits at its end until N followers have acknowledged its LSN.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._storage.checkpoint import checkpoint_bytes
from .._storage.codec import crc32c, encode_record
from .._storage.wal import frame
from ..config import replicas_needed
from ..errors import DurabilityError, NotLeaderError, ReplicationError
from .link import FENCED, Scripts, connect, redis_errors
from .wire import (
    CHUNK,
    FOLLOWER,
    LEADER,
    Keys,
    Manifest,
    RoleFile,
    decode_manifest,
    encode_entry,
    encode_manifest,
    new_node_id,
    read_role,
    write_role,
)

if TYPE_CHECKING:
    from .._core.engine import MMSBState
    from .._storage.bus import DurableBus

__all__ = ["Leader", "start_leader", "preflight", "KEEP_CHECKPOINTS"]

log = logging.getLogger("mmsb.replication")

KEEP_CHECKPOINTS = 2
"""Published checkpoints kept in Redis; the stream is trimmed behind the oldest."""
_BATCH_ENTRIES = 512
_BATCH_BYTES = 8 << 20
_ENTRY_BYTES = 64 << 10
"""Frames are packed into one stream entry up to about this many bytes."""
_QUEUE_LIMIT = 256 << 20
"""Bytes of frames held for a server that does not answer; past it they are dropped and
a checkpoint published once it answers again (followers re-bootstrap over the gap)."""


class Leader:
    """The replicating side of one durable bus (see the module docstring)."""

    def __init__(self, state: MMSBState, bus: DurableBus, url: str, term: int, node: str,
                 start: int, client: Any) -> None:
        cfg = state.config
        self.bus = bus
        self.url = url
        self.keys = Keys(bus.bus_id)
        self.term = term
        self.node = node
        self.start_lsn = start
        self.need = replicas_needed(cfg.ack)
        self.ack = cfg.ack
        self.ack_timeout = float(cfg.ack_timeout)
        self.ttl_ms = int(cfg.replication_lease * 1000)
        self.client = client
        self.scripts = Scripts(client)
        self.cv = threading.Condition()
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.queued_bytes = 0
        self.shipped = start - 1
        """Newest LSN whose frame is in the stream."""
        self.acks: dict[str, int] = {}
        self.confirmed = 0
        self.fenced: str | None = None
        self.ckpt_pending: tuple[int, bytes] | None = None
        self.ckpt_wanted = False
        self.gap = False
        self.down_since: float | None = None
        self.stopping = False
        self.state_ref = weakref.ref(state)
        """The state (weakly: it holds this leader through its bus)."""
        self.stats = {"frames": 0, "entries": 0, "checkpoints": 0, "retries": 0}
        self._threads: list[threading.Thread] = []

    # -- called by the bus ------------------------------------------------------------
    def enqueue(self, first: int, last: int, data: bytes) -> None:
        """Queue frames the bus just appended (caller holds the bus's io_lock)."""
        with self.cv:
            if self.queued_bytes + len(data) > _QUEUE_LIMIT and self.queue:
                # The server has not answered for long: drop what is held and publish a
                # checkpoint once it answers (followers cross the gap through it).
                self.queue.clear()
                self.queued_bytes = 0
                self.gap = True
                self.ckpt_wanted = True
            self.queue.append((first, last, data))
            self.queued_bytes += len(data)
            self.cv.notify_all()

    def after_call(self, state: MMSBState) -> None:
        """End of a call holding the state's lock: publish a checkpoint a follower asked
        for (see ``wait_acks`` for the acknowledgements)."""
        if self.ckpt_wanted and not state.batch_depth:
            self.ckpt_wanted = False
            self._take_checkpoint(state)

    def wait_acks(self, lsn: int) -> None:
        """After a call that ended at LSN ``lsn`` released the state's lock: with
        ``ack="replicas:N"``, wait until N followers have acknowledged it.

        Raises:
            DurabilityError: not acknowledged in time (the write stays in the log).
            NotLeaderError: this leader was fenced off by a newer term.
        """
        if not self.need or lsn <= self.confirmed or lsn < self.start_lsn:
            return
        deadline = time.monotonic() + self.ack_timeout
        with self.cv:
            while True:
                if self.fenced is not None:
                    raise NotLeaderError(
                        f"LSN {lsn} is in this bus's log, but {self.fenced}; it may not be in "
                        "the new leader's history")
                have = sorted(self.acks.values(), reverse=True)
                if len(have) >= self.need and have[self.need - 1] >= lsn:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    got = sum(1 for v in have if v >= lsn)
                    raise DurabilityError(
                        f"LSN {lsn} is applied and in the leader's log at {self.bus.root}, but "
                        f"only {got} of the {self.need} followers asked for (ack="
                        f"{self.ack!r}) confirmed it within {self.ack_timeout:g} s. It "
                        "stays in the log and may still reach them; until one has it, a "
                        "follower promoted after this leader died would not.")
                self.cv.wait(min(left, 0.5))
            if lsn > self.confirmed:
                self.confirmed = lsn

    def after_checkpoint(self, state: MMSBState) -> None:
        """The bus checkpointed (caller holds the state's lock): publish one."""
        if not state.batch_depth:
            self._take_checkpoint(state)

    def close(self, state: MMSBState) -> None:
        """Ship what is queued (a few seconds at most), give the lease back, stop."""
        deadline = time.monotonic() + min(5.0, self.ack_timeout)
        with self.cv:
            while ((self.queue or self.ckpt_pending) and self.fenced is None
                   and self.down_since is None and time.monotonic() < deadline):
                self.cv.wait(0.05)
            self.stopping = True
            self.cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        if self.fenced is None:
            try:
                self.scripts.release(keys=[self.keys.lease], args=[self.term, self.node])
            except redis_errors() as exc:
                log.warning("could not give back the lease of %s: %s", self.bus.root, exc)
        try:
            self.client.close()
        except Exception:  # noqa: S110 - closing a client that failed is best effort
            pass

    # -- checkpoints ----------------------------------------------------------------
    def _take_checkpoint(self, state: MMSBState) -> None:
        """Serialize the state now (caller holds its lock); the shipper uploads it."""
        data = checkpoint_bytes(state)
        with self.cv:
            self.ckpt_pending = (state.log.last_lsn, data)
            self.cv.notify_all()

    def _upload_checkpoint(self, lsn: int, data: bytes) -> None:
        r = self.client
        k = self.keys
        chunks = max(1, -(-len(data) // CHUNK))
        man = Manifest(self.bus.bus_id, self.term, lsn, secrets.randbits(64), len(data), chunks,
                       crc32c(data))
        pipe = r.pipeline(transaction=False)
        for i in range(chunks):
            pipe.set(k.chunk(man, i), data[i * CHUNK:(i + 1) * CHUNK])
        pipe.execute()
        ok = self.scripts.publish(keys=[k.term, k.ckpts], args=[self.term, lsn,
                                                               encode_manifest(man)])
        if not int(ok):
            self._fence("a newer term began before this leader's checkpoint was published")
            return
        self.stats["checkpoints"] += 1
        self._trim()

    def _trim(self) -> None:
        """Keep KEEP_CHECKPOINTS manifests; trim every stream behind the oldest kept."""
        r = self.client
        k = self.keys
        raw = r.zrange(k.ckpts, 0, -1)
        mans = []
        for m in raw:
            try:
                mans.append((decode_manifest(m), m))
            except Exception:  # a foreign member is dropped with the old ones
                r.zrem(k.ckpts, m)
        mans.sort(key=lambda x: x[0].lsn)
        old, kept = mans[:-KEEP_CHECKPOINTS], mans[-KEEP_CHECKPOINTS:]
        for man, member in old:
            r.zrem(k.ckpts, member)
            r.delete(*[k.chunk(man, i) for i in range(man.chunks)])
        if not kept:
            return
        floor = kept[0][0].lsn
        for t_raw in r.hkeys(k.terms):
            t = int(t_raw)
            if t == self.term:
                r.xtrim(k.log(t), minid=f"{floor}-0")
            elif t < self.term:
                top = r.xrevrange(k.log(t), count=1)
                if not top or int(top[0][0].split(b"-")[0]) < floor:
                    r.delete(k.log(t))

    def _fence(self, why: str) -> None:
        msg = f"this bus is no longer the leader: {why}"
        with self.cv:
            if self.fenced is None:
                log.error("%s (%s)", msg, self.bus.root)
            self.fenced = msg
            self.bus.not_leader = msg
            self.cv.notify_all()

    # -- the threads ----------------------------------------------------------------
    def start_threads(self) -> None:
        for fn, name in ((self._ship_loop, "mmsb-repl-ship"), (self._ack_loop, "mmsb-repl-acks")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def _ship_loop(self) -> None:
        renew_every = self.ttl_ms / 3000.0
        next_renew = time.monotonic() + renew_every
        next_ckreq = time.monotonic() + 0.5
        backoff = 0.02
        while True:
            with self.cv:
                while (not self.queue and self.ckpt_pending is None and not self.stopping
                       and time.monotonic() < min(next_renew, next_ckreq)):
                    self.cv.wait(max(0.0, min(next_renew, next_ckreq) - time.monotonic()))
                if self.stopping or self.fenced is not None:
                    return
                batch = [self.queue[i] for i in range(min(len(self.queue), _BATCH_ENTRIES))]
                size = 0
                for i, item in enumerate(batch):
                    size += len(item[2])
                    if size > _BATCH_BYTES and i:
                        del batch[i:]
                        break
                ckpt = self.ckpt_pending
            try:
                now = time.monotonic()
                if now >= next_renew:
                    ok = self.scripts.renew(keys=[self.keys.term, self.keys.lease],
                                            args=[self.term, self.node, self.ttl_ms])
                    if not int(ok):
                        self._fence(f"term {self.term} was superseded (or its lease taken)")
                        return
                    next_renew = now + renew_every
                if now >= next_ckreq:
                    next_ckreq = now + 0.5
                    if self.client.get(self.keys.ckreq) is not None:
                        self.client.delete(self.keys.ckreq)
                        self._want_checkpoint()
                if self.down_since is not None:
                    self._resync()
                if batch:
                    self._ship(batch)
                if ckpt is not None:
                    self._upload_checkpoint(*ckpt)
                    with self.cv:
                        if self.ckpt_pending is ckpt:
                            self.ckpt_pending = None
                        self.cv.notify_all()
                self.down_since = None
                backoff = 0.02
            except redis_errors() as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("Redis at %s does not answer (%s); frames are held and "
                                "shipped when it does", self.url, exc)
                self.stats["retries"] += 1
                with self.cv:
                    self.cv.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception as exc:
                text = str(exc)
                if text.startswith(FENCED):
                    self._fence(f"term {text.split()[-1]} began after term {self.term}")
                    return
                log.exception("shipping the log of %s failed", self.bus.root)
                with self.cv:
                    self.cv.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def _want_checkpoint(self) -> None:
        """A follower asked for a checkpoint: take one now if no call is running (the
        state's lock is free), else at the end of the next call."""
        state = self.state_ref()
        if state is None:
            return
        if state.lock.acquire(blocking=False):
            try:
                if not state.closed and not state.batch_depth:
                    self._take_checkpoint(state)
                    return
            finally:
                state.lock.release()
        self.ckpt_wanted = True

    def _resync(self) -> None:
        """After the server failed to answer: drop queued frames it already has (a
        script may have run before its answer was lost)."""
        top = self.client.xrevrange(self.keys.log(self.term), count=1)
        have = int(top[0][0].split(b"-")[0]) if top else 0
        with self.cv:
            while self.queue and self.queue[0][1] <= have:
                self.queued_bytes -= len(self.queue.popleft()[2])
            if have > self.shipped:
                self.shipped = have
            self.cv.notify_all()
        if self.gap:
            self.gap = False
            self._want_checkpoint()

    def _ship(self, batch: list[tuple[int, int, bytes]]) -> None:
        """Add queued frames to the stream: consecutive frames travel together, up to
        _ENTRY_BYTES an entry (fewer entries: less work on both sides per record)."""
        args: list[Any] = [self.term, time.time_ns(), 0]
        now = time.time_ns()
        bus_id = self.bus.bus_id
        group: list[bytes] = []
        first = size = 0
        entries = 0
        for i, (f, last, data) in enumerate(batch):
            if not group:
                first = f
            group.append(data)
            size += len(data)
            if size >= _ENTRY_BYTES or i == len(batch) - 1:
                args.append(f"{last}-0")
                args.append(encode_entry(bus_id, self.term, first, last, b"".join(group), now))
                entries += 1
                group, size = [], 0
        args[2] = entries
        k = self.keys
        self.scripts.ship(keys=[k.term, k.log(self.term), k.head], args=args)
        with self.cv:
            # (The queue may have been emptied meanwhile, when it outgrew its limit.)
            while self.queue and self.queue[0][1] <= batch[-1][1]:
                self.queued_bytes -= len(self.queue.popleft()[2])
            self.shipped = batch[-1][1]
            self.stats["frames"] += len(batch)
            self.stats["entries"] += entries
            self.cv.notify_all()

    def _ack_loop(self) -> None:
        client = connect(self.url, block=True)
        last_id = b"0-0"
        key = self.keys.acks
        term = str(self.term).encode()
        try:
            while not self.stopping and self.fenced is None:
                try:
                    res = client.xread({key: last_id}, count=1000, block=200)
                except redis_errors():
                    time.sleep(0.1)
                    continue
                if not res:
                    continue
                seen: dict[str, int] = {}
                for _key, entries in res:
                    for eid, fields in entries:
                        last_id = eid
                        if fields.get(b"t") != term:
                            continue
                        try:
                            node = fields[b"n"].decode("ascii")
                            lsn = int(fields[b"l"])
                        except (KeyError, ValueError, UnicodeDecodeError):
                            continue
                        if lsn > seen.get(node, 0):
                            seen[node] = lsn
                if seen:
                    # Under the condition's lock: waiting calls read the table under it.
                    with self.cv:
                        for node, lsn in seen.items():
                            if lsn > self.acks.get(node, 0):
                                self.acks[node] = lsn
                        self.cv.notify_all()
        finally:
            client.close()


def preflight(url: str) -> None:
    """Check that Redis at ``url`` answers, before a leader's bus is opened.

    Raises:
        ReplicationError: it does not. MissingDependencyError: no redis-py.
    """
    client = connect(url)
    try:
        client.ping()
    except redis_errors() as exc:
        raise ReplicationError(f"cannot reach Redis at {url} ({exc}); the bus was not "
                               "opened") from None
    finally:
        client.close()


def start_leader(state: MMSBState, url: str) -> Leader:
    """Make the durable bus behind ``state`` the leader of its bus id in Redis at
    ``url``: claim a new term (refused while another node holds the lease, or when a
    newer term superseded this directory), republish what the stream lacks of this
    log, publish a checkpoint, start shipping.

    Raises:
        ReplicationError: see above, or the server cannot be reached.
        MissingDependencyError: redis-py is not installed.
    """
    bus = state.bus
    assert bus is not None
    root = Path(bus.root)
    role = read_role(root)
    if role is not None and role.role == FOLLOWER:
        raise ReplicationError(
            f"{root} is a follower's copy of bus {bus.bus_id:016x} (term {role.term}); make it "
            "the leader with `mmsb promote` (or Follower.promote()), not by opening it as one")
    node = role.node if role is not None else new_node_id()
    mine = role.term if role is not None else 0
    client = connect(url)
    k = Keys(bus.bus_id)
    scripts = Scripts(client)
    last = state.log.last_lsn
    horizon = state.log.horizon_lsn
    try:
        res = scripts.claim(keys=[k.term, k.lease, k.terms, k.log(mine)],
                            args=[node, int(state.config.replication_lease * 1000), mine, last,
                                  horizon])
    except redis_errors() as exc:
        client.close()
        raise ReplicationError(f"cannot reach Redis at {url} to lead bus {bus.bus_id:016x} "
                               f"({exc}); the bus was not opened") from None
    code = int(res[0])
    if code == -1:
        client.close()
        raise ReplicationError(
            f"bus {bus.bus_id:016x} is led by another node (lease {res[1].decode()!r} in Redis at "
            f"{url}); this one may lead only after that lease lapses or is given back")
    if code == -2:
        client.close()
        raise ReplicationError(
            f"Redis at {url} is at term {int(res[1])} of bus {bus.bus_id:016x}, newer than "
            f"this directory's ({mine or 'none'}): another node leads now. Open {root} as a "
            "follower (mmsb.follow) so that it catches up")
    if code == -3:
        client.close()
        raise ReplicationError(
            f"the stream of term {mine} in Redis at {url} holds LSNs up to {int(res[1])}, but "
            f"this directory's log ends at {last} (records lost in a power failure?); "
            "followers may have acknowledged the rest. Promote the most advanced follower "
            f"(mmsb promote) and let {root} rejoin as a follower")
    term, start = code, int(res[1])
    try:
        write_role(root, RoleFile(LEADER, term, node, url))
    except OSError as exc:
        client.close()
        raise ReplicationError(f"cannot record the leader's term in {root}/REPL ({exc}); the "
                               "bus was not opened") from None
    leader = Leader(state, bus, url, term, node, start, client)
    # What the stream lacks of this log goes out first, re-encoded one record a frame.
    for rec in state.log.iter_records(start - 1, last):
        leader.enqueue(rec.lsn, rec.lsn, frame(encode_record(rec)))
    leader.shipped = start - 1
    leader._take_checkpoint(state)
    bus.ship = leader.enqueue
    bus.replication = leader
    leader.start_threads()
    return leader
