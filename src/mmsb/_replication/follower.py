"""Followers: a durable bus in a local directory that applies what its leader
published to Redis (``mmsb.follow``).

A follower bootstraps from the newest published checkpoint that belongs to the current
history, then reads its term's stream from the next LSN. Each entry is checked (header
CRC, bus, term, LSN continuity, the frame's own CRC) and its records are applied as
recovery applies the log's (each must follow the state), then the same frames are
appended to the follower's own log and synced, and only then acknowledged. A gap, a
damaged entry or a refused record is never applied: the follower reads the entry again
and, when it stays wrong, asks for a fresh checkpoint and bootstraps from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._api import query_page
from .._core.engine import MMSBState, check_path, check_timeout
from .._core.events import Event
from .._history.timetravel import read_page_at
from .._reader import BusReader, attach
from .._storage.bus import apply_frames, open_bus
from .._storage.checkpoint import read_checkpoint
from .._storage.codec import crc32c
from ..config import MMSBConfig
from ..errors import (
    DurabilityError,
    InvalidArgumentError,
    MMSBError,
    ReplicationError,
    SerializationError,
    StateClosedError,
)
from .leader import Leader
from .link import Scripts, connect, redis_errors
from .wire import (
    FOLLOWER,
    LEADER,
    Keys,
    Manifest,
    RoleFile,
    check_node,
    decode_entry,
    decode_manifest,
    new_node_id,
    read_role,
    write_role,
)

__all__ = ["Follower", "FollowerLag", "follow"]

log = logging.getLogger("mmsb.replication")

_READ_COUNT = 2048
_BLOCK_MS = 200


@dataclass(frozen=True)
class FollowerLag:
    """How far a follower is behind its leader."""

    lsns: int
    """LSNs the leader has shipped that this follower has not applied."""
    seconds: float
    """Since the oldest frame not yet applied was shipped (0 when caught up)."""
    leader_lsn: int
    applied_lsn: int
    term: int


class _Repair(Exception):
    """What the stream holds cannot be applied from here: bootstrap again."""


def _bus_id(value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 16)
        except ValueError:
            raise InvalidArgumentError(f"a bus id is an int or 16 hex digits, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 64:
        raise InvalidArgumentError(f"a bus id is an int or 16 hex digits, not {value!r}")
    return value


class Follower:
    """A local copy of a replicated bus that follows its leader (see :func:`follow`)."""

    def __init__(self, url: str, bus_id: int | str, path: str | os.PathLike[str], *,
                 config: MMSBConfig | None = None, node: str | None = None,
                 auto_promote: bool = False,
                 on_promote: Callable[[MMSBState], None] | None = None) -> None:
        if not isinstance(url, str):
            raise InvalidArgumentError(f"the Redis URL must be a str, not {type(url).__name__}")
        if config is not None and not isinstance(config, MMSBConfig):
            raise InvalidArgumentError(f"config must be an MMSBConfig, not {type(config).__name__}")
        if node is not None:
            check_node(node)
        self.url = url
        self.bus_id = _bus_id(bus_id)
        self.path = Path(path)
        self.keys = Keys(self.bus_id)
        cfg = dataclasses.replace(config) if config is not None else MMSBConfig()
        # Checked as a leader's config would be: promotion makes it one.
        dataclasses.replace(cfg, replicate_to=url).validate()
        self.leader_ack = cfg.ack
        cfg.replicate_to = None
        cfg.enable_gpu = False
        self.config = cfg
        self.auto_promote = bool(auto_promote)
        self.on_promote = on_promote
        self.ttl = float(cfg.replication_lease)
        self.client = connect(url)
        try:
            self.client.ping()  # before anything is created on disk
        except redis_errors() as exc:
            self.client.close()
            raise ReplicationError(f"cannot reach Redis at {url} ({exc}); nothing was "
                                   "created") from None
        self.scripts = Scripts(self.client)
        self.cv = threading.Condition()
        self.lock = threading.RLock()
        """Held while applying or promoting (one at a time)."""
        self._state: MMSBState | None = None
        self.stopping = False
        self.promoted = False
        self.error: BaseException | None = None
        self.terms: dict[int, int] = {}
        self.stats = {"entries": 0, "records": 0, "bootstraps": 0, "repairs": 0}
        self._thread: threading.Thread | None = None
        self._lease_gone: float | None = None
        self._state = self._open_state()
        try:
            role = read_role(self.path)
        except BaseException:
            self._discard()
            raise
        if role is not None and role.role == LEADER:
            # A leader's directory (one that died, or stepped down) rejoins as a follower:
            # whatever it logged after the newer term began is replaced by bootstrap.
            role = RoleFile(FOLLOWER, role.term, role.node, url)
        self.node = check_node(node) if node is not None else (role.node if role else new_node_id())
        self.term = role.term if role is not None else 0
        self.need_bootstrap = role is None
        self.want_lsn = 0
        """The least LSN a checkpoint must reach to repair what is missing here."""
        self.bad_manifests: set[bytes] = set()
        """Published checkpoints whose chunks did not match their manifest."""
        self.verified = False
        """This copy's history was checked against the terms in Redis (a copy of a
        leader that was replaced may hold records the new history does not): until
        then ``wait_for`` counts none of them."""
        try:
            write_role(self.path, RoleFile(FOLLOWER, self.term, self.node, self.url))
        except OSError as exc:
            self._discard()
            raise ReplicationError(f"cannot record the follower's role in {self.path}/REPL "
                                   f"({exc})") from None

    # -- the local bus ------------------------------------------------------------------
    def _open_state(self) -> MMSBState:
        state = MMSBState(dataclasses.replace(self.config))
        open_bus(state, self.path, bus_id=self.bus_id)
        assert state.bus is not None
        state.bus.not_leader = (f"{self.path} is a follower of bus {self.bus_id:016x}: it applies "
                                "only what its leader logged; write to the leader")
        return state

    def _discard(self) -> None:
        """Close the local bus without writing anything (a refused start)."""
        state = self._state
        if state is not None and not state.closed:
            if state.bus is not None:
                state.bus.abandon("the follower did not start")
            state.close()
        self.client.close()

    def _reopen(self) -> None:
        """Discard the in-memory state (it may hold records its log does not) and
        recover it from the directory."""
        state = self._state
        if state is not None and not state.closed:
            if state.bus is not None:
                state.bus.abandon("discarded to be recovered again")
            try:
                state.close()
            except MMSBError:
                pass  # the bus is closed all the same; its log is what counts
        self._state = self._open_state()

    @contextlib.contextmanager
    def _changing(self, state: MMSBState) -> Iterator[None]:
        """A change of the local copy, as one call of the state: if it fails part way,
        the copy in memory is discarded and recovered from the directory."""
        state.enter()
        try:
            yield
        except BaseException:
            try:
                state.leave()
            finally:
                self._reopen()
            raise
        state.leave()

    @property
    def state(self) -> MMSBState:
        """The local copy (an ``MMSBState``): read it freely; writes raise
        NotLeaderError. After a repair it is a new object: ask for it again."""
        assert self._state is not None
        return self._state

    @property
    def applied_lsn(self) -> int:
        return self.state.log.last_lsn

    # -- reading ----------------------------------------------------------------------
    @property
    def last_lsn(self) -> int:
        """The newest LSN applied here (as ``BusReader.last_lsn``)."""
        return self.applied_lsn

    def query_page(self, page_id: int) -> bytes:
        """The page's bytes as applied here (:func:`mmsb.query_page` on the copy)."""
        return query_page(self.state, page_id)

    read_page = query_page
    """The same, by the name ``BusReader`` uses."""

    def read_page_at(self, page_id: int, *, lsn: int | None = None, epoch: int | None = None,
                     timestamp: int | None = None) -> bytes:
        """:func:`mmsb.read_page_at` on the follower's history."""
        return read_page_at(self.state, page_id, lsn=lsn, epoch=epoch, timestamp=timestamp)

    def reader(self) -> BusReader:
        """A :class:`mmsb.BusReader` on the follower's directory (``mmsb.attach``)."""
        return attach(self.path)

    def changes(self, since: int = 0, *, follow: bool = False,
                timeout: float | None = None) -> Iterator[Event]:
        """The change feed of the follower's log (see ``BusReader.changes``)."""
        reader = self.reader()
        try:
            yield from reader.changes(since, follow=follow, timeout=timeout)
        finally:
            reader.close()

    def wait_for(self, lsn: int, timeout: float | None = None) -> bool:
        """Wait until LSN ``lsn`` is applied here; False after ``timeout`` seconds.

        Raises:
            InvalidArgumentError: lsn is not an int >= 0, or timeout is not None nor a
                number >= 0.
        """
        if isinstance(lsn, bool) or not isinstance(lsn, int) or lsn < 0:
            raise InvalidArgumentError(f"lsn must be an int >= 0, not {lsn!r}")
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while not self._caught_up(lsn):
                if self.error is not None or self.promoted or self.stopping:
                    return self._caught_up(lsn)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cv.wait(0.1 if left is None else min(left, 0.1))
        return True

    def _caught_up(self, lsn: int) -> bool:
        """LSN ``lsn`` is applied here, on a copy checked against the current history
        and not in the middle of a repair."""
        return self.verified and not self.need_bootstrap and self.applied_lsn >= lsn

    @property
    def lag(self) -> FollowerLag:
        """The leader's newest shipped LSN against what is applied here (asked of Redis
        on each read).

        Raises:
            ReplicationError: Redis cannot be reached.
        """
        applied = self.applied_lsn
        try:
            head = self.client.hgetall(self.keys.head)
            leader_lsn = int(head.get(b"lsn", 0))
            seconds = 0.0
            if leader_lsn > applied:
                nxt = self.client.xrange(self.keys.log(self.term), min=f"{applied + 1}-0",
                                         count=1)
                shipped = None
                if nxt:
                    try:
                        shipped = decode_entry(nxt[0][1][b"f"]).time_ns
                    except (SerializationError, KeyError):
                        shipped = None
                if shipped is None:
                    shipped = int(head.get(b"time", time.time_ns()))
                seconds = max(0.0, (time.time_ns() - shipped) / 1e9)
        except redis_errors() as exc:
            raise ReplicationError(f"cannot reach Redis at {self.url} ({exc})") from None
        return FollowerLag(max(0, leader_lsn - applied), seconds, leader_lsn, applied, self.term)

    # -- running ----------------------------------------------------------------------
    def start(self) -> Follower:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mmsb-follower", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop following and close the local bus (unless it was promoted: then its
        state is the caller's, a leader, to stop with ``mmsb_stop``)."""
        self.stopping = True
        with self.cv:
            self.cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        with self.lock:
            if not self.promoted and self._state is not None and not self._state.closed:
                self._state.close()
        try:
            if not self.promoted:
                self.client.hdel(self.keys.followers, self.node)
        except redis_errors():
            pass
        self.client.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        backoff = 0.05
        block = connect(self.url, block=True)
        try:
            while not self.stopping and not self.promoted:
                try:
                    with self.lock:
                        if self.stopping or self.promoted:
                            return
                        if self.need_bootstrap:
                            self._bootstrap()
                    if self.need_bootstrap:
                        # Nothing usable yet (none published, or one being replaced).
                        with self.cv:
                            self.cv.wait(0.2)
                        continue
                    with self.lock:
                        applied = self._step(block)
                    if not applied:
                        self._idle()
                    backoff = 0.05
                except _Repair as why:
                    log.warning("follower %s of bus %016x: %s; bootstrapping from a checkpoint",
                                self.node, self.bus_id, why)
                    self.stats["repairs"] += 1
                    self.need_bootstrap = True
                except redis_errors() as exc:
                    log.info("follower %s: Redis does not answer (%s); retrying", self.node, exc)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                except DurabilityError as exc:
                    # This copy's own disk refused (full, say): the copy was recovered
                    # from its directory again; try again later.
                    log.error("follower %s could not log what it applied (%s); retrying",
                              self.node, exc)
                    with self.cv:
                        self.cv.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                except StateClosedError:
                    return
                except Exception as exc:
                    log.exception("follower %s of bus %016x stopped", self.node, self.bus_id)
                    self.error = exc
                    with self.cv:
                        self.cv.notify_all()
                    return
        finally:
            block.close()

    def _refresh_terms(self) -> None:
        raw = self.client.hgetall(self.keys.terms)
        self.terms = {int(k): int(v) for k, v in raw.items()}

    def _next_term(self) -> tuple[int, int] | None:
        later = [t for t in self.terms if t > self.term]
        if not later:
            return None
        t = min(later)
        return t, self.terms[t]

    def _switch(self, term: int) -> None:
        """Follow ``term`` from here on (recorded before any of its frames is applied)."""
        write_role(self.path, RoleFile(FOLLOWER, term, self.node, self.url))
        self.term = term

    def _step(self, block: Any) -> bool:
        """Read and apply what follows; True if anything was applied (or the term moved)."""
        a = self.applied_lsn
        if not self.verified:
            self._refresh_terms()
        nxt = self._next_term()
        if nxt is not None:
            if a + 1 == nxt[1]:
                self._switch(nxt[0])
                return True
            if a + 1 > nxt[1]:
                self.want_lsn = 0
                self.verified = False
                raise _Repair(f"this copy holds LSNs up to {a} of term {self.term}, but term "
                              f"{nxt[0]} began at LSN {nxt[1]}")
        if not self.verified:
            self.verified = True
            with self.cv:
                self.cv.notify_all()
        streams = {self.keys.log(self.term): f"{a}-0", self.keys.log(self.term + 1): "0-0"}
        res = block.xread(streams, count=_READ_COUNT, block=_BLOCK_MS)
        mine = self.keys.log(self.term).encode()
        entries = []
        for key, items in res or ():
            if key == mine:
                entries = items
            else:
                self._refresh_terms()  # frames of a newer term: learn where it starts
        if nxt is None:
            return bool(entries) and self._apply_entries(entries, None)
        if entries and self._apply_entries(entries, nxt[1] - 1):
            return True
        # The term followed here is over (a newer one began), so its stream can no
        # longer grow: what it lacks before the newer term's start is not coming.
        self._ask_checkpoint(a + 1)
        self.want_lsn = a + 1
        raise _Repair(f"the stream of term {self.term} holds nothing after LSN {a}, but term "
                      f"{nxt[0]} begins only at LSN {nxt[1]}")

    def _apply_entries(self, entries: list[Any], limit: int | None, again: bool = True) -> bool:
        """Check the entries' headers and order, then apply their frames in one pass."""
        frames: list[memoryview] = []
        first = expect = self.applied_lsn + 1
        bad: str | None = None
        for eid, fields in entries:
            try:
                e = decode_entry(fields[b"f"])
                if e.bus_id != self.bus_id or e.term != self.term:
                    raise SerializationError(f"an entry of bus {e.bus_id:016x} term {e.term} "
                                             f"in the stream of term {self.term}")
                if int(eid.split(b"-")[0]) != e.last_lsn:
                    raise SerializationError(f"entry {eid.decode()} holds LSNs up to "
                                             f"{e.last_lsn}")
            except (SerializationError, KeyError) as exc:
                bad = f"entry {eid.decode()}: {exc}"
                break
            if limit is not None and e.last_lsn > limit:
                break  # past where a newer term begins
            if e.last_lsn < expect:
                continue  # already applied
            if e.first_lsn != expect:
                bad = f"LSNs {expect}..{e.first_lsn - 1} are missing before entry {eid.decode()}"
                break
            frames.append(e.frame)
            expect = e.last_lsn + 1
        applied = 0
        if frames:
            applied = self._apply(b"".join(frames), first, expect - first)
            if applied < expect - first:
                bad = bad or "a frame in the stream is damaged"
                expect = first + applied
        if bad is not None:
            if again:
                # Read once more from where this stopped: a reply cut in transit differs.
                more = self.client.xrange(self.keys.log(self.term), min=f"{expect}-0",
                                          count=_READ_COUNT)
                if more:
                    return self._apply_entries(more, limit, again=False) or bool(applied)
            self._ask_checkpoint(expect)
            self.want_lsn = expect
            raise _Repair(bad)
        return bool(applied)

    def _apply(self, data: bytes, first: int, count: int) -> int:
        """Apply and log frames holding records ``first`` … ``first + count - 1``;
        returns how many were (fewer: a damaged frame, after which nothing is)."""
        state = self.state
        with self._changing(state):
            good, problem, discard = apply_frames(state, data, first, self.path / "wal")
            if discard:
                raise _Repair(f"a record does not follow this copy ({problem})")
        if problem is not None:
            log.warning("follower %s: %s", self.node, problem)
        if good:
            self.stats["records"] += good
            self.stats["entries"] += 1
            self._ack()
            with self.cv:
                self.cv.notify_all()
        return good

    def _ack(self) -> None:
        lsn = self.applied_lsn
        now = time.time_ns()
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.acks, {"n": self.node, "t": self.term, "l": lsn}, maxlen=10000,
                  approximate=True)
        pipe.hset(self.keys.followers, self.node, f"{lsn}:{self.term}:{now}:{self.path}")
        pipe.execute()

    def _ask_checkpoint(self, lsn: int) -> None:
        self.client.set(self.keys.ckreq, lsn, px=60_000)

    # -- bootstrap --------------------------------------------------------------------
    def _valid(self, man: Manifest) -> bool:
        """A checkpoint is part of the current history when no newer term began at or
        before its LSN."""
        later = [self.terms[t] for t in self.terms if t > man.term]
        return man.bus_id == self.bus_id and man.term in self.terms and (
            not later or man.lsn < min(later))

    def _bootstrap(self) -> None:
        """Replace the local copy with the newest published checkpoint of the current
        history (asking the leader for one when there is none), then follow its term."""
        self._refresh_terms()
        best: tuple[Manifest, bytes] | None = None
        for raw in self.client.zrange(self.keys.ckpts, 0, -1):
            try:
                man = decode_manifest(raw)
            except SerializationError:
                continue
            if raw in self.bad_manifests:
                continue
            if self._valid(man) and (best is None or (man.lsn, man.term) > (best[0].lsn,
                                                                            best[0].term)):
                best = (man, raw)
        if best is None or best[0].lsn < self.want_lsn:
            # None yet, or none past what is missing here: ask the leader for one.
            self._ask_checkpoint(max(self.want_lsn, 1))
            return
        man = best[0]
        chunks: list[bytes | None] = []
        for i in range(0, man.chunks, 16):
            chunks += self.client.mget([self.keys.chunk(man, j)
                                        for j in range(i, min(i + 16, man.chunks))])
            if chunks[-1] is None or sum(len(c or b"") for c in chunks) > man.size:
                break
        if len(chunks) != man.chunks or any(c is None for c in chunks):
            return  # trimmed meanwhile (or not what the manifest says): look again
        data = b"".join(c for c in chunks if c is not None)
        if len(data) != man.size or crc32c(data) != man.crc:
            log.warning("published checkpoint at LSN %d is damaged; asking for another", man.lsn)
            self._ask_checkpoint(man.lsn)
            self.bad_manifests.add(best[1])
            return
        try:
            ck = read_checkpoint(data, path_label=f"checkpoint at LSN {man.lsn} in Redis")
            if ck.lsn != man.lsn:
                raise SerializationError(f"the checkpoint published as LSN {man.lsn} is at "
                                         f"LSN {ck.lsn}")
        except SerializationError as exc:
            log.warning("follower %s: the published checkpoint at LSN %d is refused (%s); "
                        "asking for another", self.node, man.lsn, exc)
            self._ask_checkpoint(man.lsn)
            self.bad_manifests.add(best[1])
            return
        state = self.state
        with self._changing(state):
            bus = state.bus
            assert bus is not None
            held, bus.not_leader = bus.not_leader, None
            try:
                bus.before_restore(state)
                state.restore(ck)
                bus.after_restore(state)
            finally:
                bus.not_leader = held
        self._switch(man.term)
        self.stats["bootstraps"] += 1
        self.want_lsn = 0
        self.need_bootstrap = False
        self._ack()
        with self.cv:
            self.cv.notify_all()

    def _diverged(self) -> bool:
        nxt = self._next_term()
        return nxt is not None and self.applied_lsn + 1 > nxt[1]

    # -- leadership -------------------------------------------------------------------
    def _idle(self) -> None:
        """Between reads: learn new terms, watch the lease, take a promotion request."""
        self._refresh_terms()
        if self.stopping:
            return
        req = self.client.get(self.keys.promote)
        lease = self.client.get(self.keys.lease)
        now = time.monotonic()
        if req is not None:
            target, _, force = req.decode("ascii", "replace").partition(":")
            if target == self.node or (target == "best" and self._is_best()):
                self.client.delete(self.keys.promote)
                self._promote_here(force == "1")
                return
        if lease is not None:
            self._lease_gone = None
            return
        if self._lease_gone is None:
            self._lease_gone = now
            return
        if self.auto_promote and now - self._lease_gone >= self.ttl:
            # The most advanced follower goes first; the others wait their turn.
            wait = self.ttl / 4 * self._rank()
            if now - self._lease_gone >= self.ttl + wait:
                self._promote_here(False)

    def _live_followers(self) -> dict[str, int]:
        out = {}
        cutoff = time.time_ns() - int(4 * self.ttl * 1e9)
        for node, raw in self.client.hgetall(self.keys.followers).items():
            try:
                lsn, term, ts = (int(x) for x in raw.decode().split(":")[:3])
            except (ValueError, UnicodeDecodeError):
                continue
            if ts >= cutoff and term == self.term:
                out[node.decode("ascii", "replace")] = lsn
        return out

    def _rank(self) -> int:
        mine = self.applied_lsn
        return sum(1 for n, lsn in self._live_followers().items()
                   if n != self.node and (lsn > mine or (lsn == mine and n < self.node)))

    def _is_best(self) -> bool:
        return self._rank() == 0

    def _promote_here(self, force: bool) -> None:
        try:
            state = self.promote(force=force)
        except ReplicationError as exc:
            log.warning("follower %s did not take over: %s", self.node, exc)
            return
        if self.on_promote is not None:
            try:
                self.on_promote(state)
            except Exception:
                log.exception("the on_promote callback of follower %s failed", self.node)

    def promote(self, *, force: bool = False) -> MMSBState:
        """Make this follower the leader: fence the current term in Redis (refused while
        the leader's lease holds, unless ``force``), apply everything the old term's
        stream holds, begin the next term from there, and start shipping. Returns the
        state, now a writable leader (stop it with ``mmsb_stop``).

        Raises:
            ReplicationError: the lease is held, the term moved on (catch up first), or
                another follower took over meanwhile. Nothing changed then.
        """
        restart = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self.stopping = True
            self._thread.join(timeout=10)
            self._thread = None
            restart = True
        try:
            return self._promote(force)
        finally:
            if restart and not self.promoted:
                # Refused: this follower goes on following.
                self.stopping = False
                self.start()

    def _promote(self, force: bool) -> MMSBState:
        with self.lock:
            if self.promoted:
                return self.state
            self._refresh_terms()
            if self.need_bootstrap or self._diverged():
                raise ReplicationError(
                    f"follower {self.node} does not hold a copy of the current history yet "
                    "(it must bootstrap first); nothing changed")
            k = self.keys
            ttl_ms = int(self.ttl * 1000)
            res = self.scripts.fence(keys=[k.term, k.lease, k.terms],
                                     args=[self.node, ttl_ms, self.term, "1" if force else "0"])
            if int(res[0]) == -1:
                raise ReplicationError(
                    f"the leader's lease {res[1].decode()!r} still holds; promote after it "
                    "lapses, or with force=True to depose a live leader")
            if int(res[0]) == -2:
                raise ReplicationError(
                    f"bus {self.bus_id:016x} is at term {int(res[1])} but this follower follows "
                    f"term {self.term}; let it catch up first")
            new = int(res[0])
            # The old term is fenced: its stream can no longer grow. Apply all of it.
            while True:
                more = self.client.xrange(k.log(self.term), min=f"{self.applied_lsn + 1}-0",
                                          count=_READ_COUNT)
                if not more:
                    break
                try:
                    if not self._apply_entries(more, None):
                        break
                except _Repair as why:
                    log.warning("promotion of %s stops at LSN %d: %s", self.node,
                                self.applied_lsn, why)
                    break
            start = self.applied_lsn + 1
            if not int(self.scripts.start(keys=[k.term, k.lease, k.terms],
                                          args=[new, self.node, start, ttl_ms])):
                raise ReplicationError("another node took over while this follower was "
                                       "promoting; it stays a follower")
            for raw in self.client.zrange(k.ckpts, 0, -1):
                try:
                    man = decode_manifest(raw)
                except SerializationError:
                    continue
                if man.term < new and man.lsn >= start:
                    # Beyond where the new term begins: not part of its history.
                    self.client.zrem(k.ckpts, raw)
                    self.client.delete(*[k.chunk(man, i) for i in range(man.chunks)])
            write_role(self.path, RoleFile(LEADER, new, self.node, self.url))
            state = self.state
            with state.lock:
                bus = state.bus
                assert bus is not None
                state.config.replicate_to = self.url
                state.config.ack = self.leader_ack
                leader = Leader(state, bus, self.url, new, self.node, start, connect(self.url))
                leader._take_checkpoint(state)
                bus.ship = leader.enqueue
                bus.replication = leader
                bus.not_leader = None
                leader.start_threads()
            self.term = new
            self.promoted = True
            self.stopping = True
            try:
                self.client.hdel(k.followers, self.node)
            except redis_errors():
                pass
            with self.cv:
                self.cv.notify_all()
            return state


def follow(url: str, bus_id: int | str, path: str | os.PathLike[str], *,
           config: MMSBConfig | None = None, node: str | None = None,
           auto_promote: bool = False,
           on_promote: Callable[[MMSBState], None] | None = None) -> Follower:
    """Follow the replicated bus ``bus_id`` (an int or 16 hex digits) published to Redis
    at ``url``, keeping a durable copy in the directory ``path`` (created, or resumed
    where it stopped; a directory that once led the bus rejoins as a follower). The
    copy is applied in a background thread; read it through the returned
    :class:`Follower` (``state``, ``read_page``, ``read_page_at``, ``changes``,
    ``lag``, ``wait_for``) or from other processes with ``mmsb.attach(path)``.
    ``auto_promote``: take over (``promote``) when the leader's lease lapses, the most
    advanced live follower first; ``on_promote(state)`` then gets the new leader.
    ``config``: the local bus's settings (its ``ack`` is the one it leads with).

    Raises:
        InvalidArgumentError: a bad argument. ReplicationError: Redis cannot be reached.
        MissingDependencyError: redis-py is not installed. BusLockedError: another
        process has ``path`` open. SerializationError: ``path`` holds another bus.
    """
    check_path(path, "follow")
    f = Follower(url, bus_id, path, config=config, node=node, auto_promote=auto_promote,
                 on_promote=on_promote)
    return f.start()
