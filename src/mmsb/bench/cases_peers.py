"""MMSB side by side with what a user would pick instead, on one workload.

The workload: ``P`` pages of 1 KiB, ``N`` updates; update ``i`` rewrites a random
64-byte region of a random page (every byte of the region changes) and every version
of every page is kept. Each peer gets the same inputs, prepared before timing: the full
new page content (what ``update_page`` takes), and the region's offset and bytes (what a
delta-logging store takes).

| peer | update | history kept as | time-travel read | checkpoint / restore |
| --- | --- | --- | --- | --- |
| ``mmsb`` | ``update_page`` (diffs) | sparse deltas in the log | ``read_page_at(epoch=version)`` | ``checkpoint_log`` / ``load_checkpoint`` |
| ``mmsb_write`` | ``write_page`` (region) | same | ``read_page_at(lsn=...)`` | same as mmsb |
| ``lmdb`` | one write txn, ``put((page, version), page bytes)`` | one key per page version | ``get`` | ``env.copy(compact=True)`` / open + read latest |
| ``sqlite`` | one autocommit ``INSERT`` per update, WAL, synchronous=NORMAL | a table of deltas | fold the page's deltas up to the version | ``backup()`` / open + fold latest |
| ``naive`` | ``dict`` of ``bytearray`` + a list of copies per page | full copies | list index | one flat file / read it back |
| ``numpy`` | one vectorized copy of all versions (the floor) | an ``N x 1 KiB`` array | row copy | ``tofile`` / ``fromfile`` |

Restore ends with every page's latest bytes in memory, for every peer. Storage is each
peer's natural form of the full history: the checkpoint file (mmsb), used LMDB pages,
the SQLite file after a WAL checkpoint, ``sys.getsizeof`` of the copies (naive), the
array's bytes (numpy).
"""

from __future__ import annotations

import abc
import os
import shutil
import sqlite3
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._harness import Measurement
from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect

PAGE = 1024
REGION = 64


@dataclass(frozen=True, slots=True)
class Workload:
    pages: int
    pids: list[int]
    """0-based page index of each update."""
    offsets: list[int]
    regions: list[bytes]
    fulls: list[bytes]
    versions: list[int]
    """The page's version after each update (1 = its first update)."""
    full_array: np.ndarray
    final: list[bytes]
    """Each page's bytes after the last update."""
    probe: int
    """Index of the update whose result the time-travel read asks for."""

    @property
    def n(self) -> int:
        return len(self.pids)


def make_workload(ctx: RunContext, key: str = "peer_workload",
                  full: tuple[int, int] = (64, 10_000)) -> Workload:
    """The workload (cached in the run under ``key``): ``full`` = (pages, updates) in a
    full run, (8, 200) in a smoke run."""
    if key in ctx.cache:
        w: Workload = ctx.cache[key]
        return w
    n_pages, n = ctx.pick(full, (8, 200))
    rng = np.random.default_rng(ctx.seed + 300)
    pids = rng.integers(0, n_pages, n)
    offs = rng.integers(0, PAGE - REGION + 1, n)
    current = np.zeros((n_pages, PAGE), dtype=np.uint8)
    fulls = np.empty((n, PAGE), dtype=np.uint8)
    regions: list[bytes] = []
    versions: list[int] = []
    count = [0] * n_pages
    for i in range(n):
        p, o = int(pids[i]), int(offs[i])
        new = current[p, o : o + REGION] ^ rng.integers(1, 256, REGION, dtype=np.uint8)
        current[p, o : o + REGION] = new
        fulls[i] = current[p]
        regions.append(new.tobytes())
        count[p] += 1
        versions.append(count[p])
    w = Workload(
        pages=n_pages,
        pids=[int(p) for p in pids],
        offsets=[int(o) for o in offs],
        regions=regions,
        fulls=[row.tobytes() for row in fulls],
        versions=versions,
        full_array=fulls,
        final=[row.tobytes() for row in current],
        probe=n // 2,
    )
    ctx.cache[key] = w
    return w


class Store(abc.ABC):
    """One peer's store of the workload's pages with full history."""

    @abc.abstractmethod
    def apply(self, w: Workload, start: int, stop: int) -> None:
        """Apply updates ``start:stop`` of the workload, keeping every version."""

    def mark_probe(self, w: Workload) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called right after update ``w.probe`` in the reference build."""

    @abc.abstractmethod
    def storage_bytes(self) -> int:
        """Bytes the store's history occupies."""

    @abc.abstractmethod
    def read_version(self, w: Workload, i: int) -> bytes:
        """The bytes of page ``w.pids[i]`` as they were right after update ``i``."""

    @abc.abstractmethod
    def checkpoint(self, path: Path) -> None:
        """Write the store (history included) to ``path``."""

    @abc.abstractmethod
    def restore(self, path: Path) -> list[bytes]:
        """Load a checkpoint; return every page's latest bytes."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release files and handles."""


class MMSBStore(Store):
    def __init__(self, ctx: RunContext, w: Workload, directory: Path, *, partial: bool) -> None:
        import mmsb

        self.mmsb = mmsb
        self.ctx = ctx
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.partial = partial
        self.state = ctx.new_state()
        ids = [p.id for p in mmsb.create_pages(self.state, w.pages, PAGE)]
        self.ids = ids
        self.update_ids = [ids[p] for p in w.pids]
        self.probe_lsn: int | None = None

    def apply(self, w: Workload, start: int, stop: int) -> None:
        state = self.state
        if self.partial:
            write = self.mmsb.write_page
            for pid, off, data in zip(
                self.update_ids[start:stop],
                w.offsets[start:stop],
                w.regions[start:stop],
                strict=True,
            ):
                write(state, pid, off, data)
        else:
            update = self.mmsb.update_page
            for pid, data in zip(self.update_ids[start:stop], w.fulls[start:stop], strict=True):
                update(state, pid, data)

    def mark_probe(self, w: Workload) -> None:
        self.probe_lsn = int(self.state.last_lsn)

    def storage_bytes(self) -> int:
        path = self.directory / "storage.mmsbckpt"
        self.mmsb.checkpoint_log(self.state, str(path))
        return path.stat().st_size

    def read_version(self, w: Workload, i: int) -> bytes:
        pid = self.update_ids[i]
        if self.partial:
            if self.probe_lsn is None:
                raise CaseSkipped("the mmsb_write store has no probe LSN recorded")
            return self.mmsb.read_page_at(self.state, pid, lsn=self.probe_lsn)
        return self.mmsb.read_page_at(self.state, pid, epoch=w.versions[i])

    def checkpoint(self, path: Path) -> None:
        self.mmsb.checkpoint_log(self.state, str(path))

    def restore(self, path: Path) -> list[bytes]:
        state = self.ctx.new_state()
        self.mmsb.load_checkpoint(state, str(path))
        query = self.mmsb.query_page
        return [bytes(query(state, pid)) for pid in self.ids]


def _lmdb_key(page: int, version: int) -> bytes:
    return struct.pack(">II", page, version)


class LMDBStore(Store):
    def __init__(self, ctx: RunContext, w: Workload, directory: Path) -> None:
        import lmdb

        self.lmdb = lmdb
        self.w = w
        directory.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(directory), map_size=1 << 32, sync=False, metasync=False, max_dbs=0
        )
        self.keys = [_lmdb_key(p, v) for p, v in zip(w.pids, w.versions, strict=True)]

    def apply(self, w: Workload, start: int, stop: int) -> None:
        begin = self.env.begin
        for key, data in zip(self.keys[start:stop], w.fulls[start:stop], strict=True):
            with begin(write=True) as txn:
                txn.put(key, data)

    def storage_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])

    def read_version(self, w: Workload, i: int) -> bytes:
        with self.env.begin() as txn:
            data = txn.get(self.keys[i])
        if data is None:
            raise KeyError(f"lmdb has no version {self.w.versions[i]} of page {self.w.pids[i]}")
        return bytes(data)

    def checkpoint(self, path: Path) -> None:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        self.env.copy(str(path), compact=True)

    def restore(self, path: Path) -> list[bytes]:
        env = self.lmdb.open(str(path), readonly=True, lock=False)
        try:
            latest: list[bytes] = []
            with env.begin() as txn:
                cursor = txn.cursor()
                for page in range(self.w.pages):
                    if cursor.set_range(_lmdb_key(page + 1, 0)):
                        found = cursor.prev()
                    else:
                        found = cursor.last()
                    key = cursor.key() if found else b""
                    if found and struct.unpack(">II", key)[0] == page:
                        latest.append(bytes(cursor.value()))
                    else:
                        latest.append(bytes(PAGE))
            return latest
        finally:
            env.close()

    def close(self) -> None:
        self.env.close()


class SQLiteStore(Store):
    def __init__(self, ctx: RunContext, w: Workload, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.w = w
        self.file = directory / "history.sqlite"
        self.con = self._open(self.file)
        self.con.execute(
            "CREATE TABLE deltas (page INTEGER, version INTEGER, off INTEGER, data BLOB, "
            "PRIMARY KEY (page, version)) WITHOUT ROWID"
        )

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        con = sqlite3.connect(str(path), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def apply(self, w: Workload, start: int, stop: int) -> None:
        execute = self.con.execute
        sql = "INSERT INTO deltas VALUES (?, ?, ?, ?)"
        for row in zip(
            w.pids[start:stop],
            w.versions[start:stop],
            w.offsets[start:stop],
            w.regions[start:stop],
            strict=True,
        ):
            execute(sql, row)

    def storage_bytes(self) -> int:
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.file.stat().st_size

    @staticmethod
    def _fold(rows: Any) -> bytes:
        buf = bytearray(PAGE)
        for off, data in rows:
            buf[off : off + len(data)] = data
        return bytes(buf)

    def read_version(self, w: Workload, i: int) -> bytes:
        rows = self.con.execute(
            "SELECT off, data FROM deltas WHERE page = ? AND version <= ? ORDER BY version",
            (w.pids[i], w.versions[i]),
        )
        return self._fold(rows)

    def checkpoint(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        dst = sqlite3.connect(str(path))
        try:
            self.con.backup(dst)
        finally:
            dst.close()

    def restore(self, path: Path) -> list[bytes]:
        con = sqlite3.connect(str(path))
        try:
            pages = [bytearray(PAGE) for _ in range(self.w.pages)]
            for page, off, data in con.execute(
                "SELECT page, off, data FROM deltas ORDER BY page, version"
            ):
                pages[page][off : off + len(data)] = data
            return [bytes(p) for p in pages]
        finally:
            con.close()

    def close(self) -> None:
        self.con.close()


class NaiveStore(Store):
    def __init__(self, ctx: RunContext, w: Workload, directory: Path) -> None:
        self.current = [bytearray(PAGE) for _ in range(w.pages)]
        self.history: list[list[bytes]] = [[] for _ in range(w.pages)]

    def apply(self, w: Workload, start: int, stop: int) -> None:
        current, history = self.current, self.history
        for p, data in zip(w.pids[start:stop], w.fulls[start:stop], strict=True):
            buf = current[p]
            buf[:] = data
            history[p].append(bytes(buf))

    def storage_bytes(self) -> int:
        total = sum(sys.getsizeof(b) for b in self.current)
        for versions in self.history:
            total += sys.getsizeof(versions) + sum(sys.getsizeof(v) for v in versions)
        return total

    def read_version(self, w: Workload, i: int) -> bytes:
        return self.history[w.pids[i]][w.versions[i] - 1]

    def checkpoint(self, path: Path) -> None:
        counts = np.array([len(v) for v in self.history], dtype="<u4")
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<I", len(self.history)))
            f.write(counts.tobytes())
            for versions in self.history:
                f.write(b"".join(versions))
        os.replace(tmp, path)

    def restore(self, path: Path) -> list[bytes]:
        raw = path.read_bytes()
        (n_pages,) = struct.unpack_from("<I", raw)
        counts = np.frombuffer(raw, dtype="<u4", count=n_pages, offset=4)
        pos = 4 + 4 * n_pages
        history: list[list[bytes]] = []
        for c in counts.tolist():
            history.append([raw[pos + k * PAGE : pos + (k + 1) * PAGE] for k in range(c)])
            pos += c * PAGE
        return [bytes(v[-1]) if v else bytes(PAGE) for v in history]


class NumpyFloor(Store):
    def __init__(self, ctx: RunContext, w: Workload, directory: Path) -> None:
        self.w = w
        self.history = np.empty((w.n, PAGE), dtype=np.uint8)

    def apply(self, w: Workload, start: int, stop: int) -> None:
        np.copyto(self.history[start:stop], w.full_array[start:stop])

    def storage_bytes(self) -> int:
        return int(self.history.nbytes)

    def read_version(self, w: Workload, i: int) -> bytes:
        return self.history[i].tobytes()

    def checkpoint(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        self.history.tofile(tmp)
        os.replace(tmp, path)

    def restore(self, path: Path) -> list[bytes]:
        history = np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE)
        last: dict[int, int] = {}
        for i, p in enumerate(self.w.pids):
            last[p] = i
        return [
            history[last[p]].tobytes() if p in last else bytes(PAGE) for p in range(self.w.pages)
        ]


def _lmdb_missing() -> str | None:
    try:
        import lmdb  # noqa: F401
    except ImportError:
        return "py-lmdb is not installed (pip install 'mmsb[bench]')"
    return None


PEERS: dict[str, str] = {
    "mmsb": "MMSB update_page",
    "mmsb_write": "MMSB write_page",
    "lmdb": "LMDB",
    "sqlite": "SQLite (WAL)",
    "naive": "naive Python",
    "numpy": "numpy floor",
}
"""Peer name -> label, in table order."""


def _open(ctx: RunContext, peer: str, w: Workload, directory: Path) -> Store:
    if peer == "mmsb":
        return MMSBStore(ctx, w, directory, partial=False)
    if peer == "mmsb_write":
        return MMSBStore(ctx, w, directory, partial=True)
    if peer == "lmdb":
        reason = _lmdb_missing()
        if reason is not None:
            raise CaseSkipped(reason)
        return LMDBStore(ctx, w, directory)
    if peer == "sqlite":
        return SQLiteStore(ctx, w, directory)
    if peer == "naive":
        return NaiveStore(ctx, w, directory)
    if peer == "numpy":
        return NumpyFloor(ctx, w, directory)
    raise ValueError(f"unknown peer {peer!r}")


def _fresh_dir(ctx: RunContext, peer: str) -> Path:
    n = ctx.cache.get("peer_dirs", 0) + 1
    ctx.cache["peer_dirs"] = n
    return ctx.path(f"peer-{peer}-{n}")


def _reference(ctx: RunContext, peer: str) -> tuple[Store, Workload]:
    key = f"peer_store_{peer}"
    missing = _lmdb_missing() if peer == "lmdb" else None
    if missing is not None:
        raise CaseSkipped(missing)
    if key not in ctx.cache:
        raise CaseSkipped(f"the {peer} store was not built (its update case did not run)")
    store, w = ctx.cache[key]
    return store, w


def _update_case(peer: str) -> None:
    @case("peers", f"update_{peer}", f"{PEERS[peer]}: one 64-byte page rewrite, full history kept")
    def run(ctx: RunContext) -> CaseOutcome:
        w = make_workload(ctx)

        def setup(n: int) -> tuple[Store, Path]:
            directory = _fresh_dir(ctx, peer)
            return _open(ctx, peer, w, directory), directory

        def batch(obj: tuple[Store, Path], n: int) -> None:
            obj[0].apply(w, 0, n)

        def teardown(obj: tuple[Store, Path]) -> None:
            obj[0].close()
            shutil.rmtree(obj[1], ignore_errors=True)

        m = ctx.measure(batch, setup=setup, teardown=teardown, inner=w.n, repeats=ctx.pick(5, 2))
        directory = _fresh_dir(ctx, peer)
        store = _open(ctx, peer, w, directory)
        ctx.on_close(store.close)
        store.apply(w, 0, w.probe + 1)
        store.mark_probe(w)
        store.apply(w, w.probe + 1, w.n)
        storage = store.storage_bytes()
        ctx.cache[f"peer_store_{peer}"] = (store, w)
        return CaseOutcome(
            m,
            {
                "peer": peer,
                "updates": w.n,
                "pages": w.pages,
                "storage_bytes": storage,
                "storage_bytes_per_update": storage / w.n,
                "updates_per_s": 1e9 / m.stats.median_ns,
            },
        )


def _time_travel_case(peer: str) -> None:
    how = {"mmsb": "read_page_at(epoch=)", "mmsb_write": "read_page_at(lsn=)"}
    desc = f"{PEERS[peer]}: read a page as of a past version" + (
        f" ({how[peer]})" if peer in how else ""
    )

    @case("peers", f"time_travel_{peer}", desc)
    def run(ctx: RunContext) -> CaseOutcome:
        store, w = _reference(ctx, peer)
        i = w.probe

        def batch(_obj: None, n: int) -> None:
            for _ in range(n):
                store.read_version(w, i)

        m: Measurement = ctx.measure(batch, max_inner=ctx.pick(10_000, 20))
        expect(
            store.read_version(w, i) == w.fulls[i],
            f"{peer}: time-travel read returned the wrong bytes",
        )
        return CaseOutcome(m, {"peer": peer, "version": w.versions[i]})


def _checkpoint_case(peer: str) -> None:
    @case("peers", f"checkpoint_{peer}", f"{PEERS[peer]}: checkpoint the full history")
    def run(ctx: RunContext) -> CaseOutcome:
        store, w = _reference(ctx, peer)
        path = ctx.path(f"peer-ckpt-{peer}")

        def batch(_obj: None, n: int) -> None:
            for _ in range(n):
                store.checkpoint(path)

        m = ctx.measure(batch, inner=1, repeats=ctx.pick(7, 2))
        return CaseOutcome(m, {"peer": peer})


def _restore_case(peer: str) -> None:
    @case("peers", f"restore_{peer}", f"{PEERS[peer]}: restore a checkpoint, read every page")
    def run(ctx: RunContext) -> CaseOutcome:
        store, w = _reference(ctx, peer)
        path = ctx.path(f"peer-restore-{peer}")
        store.checkpoint(path)

        def batch(_obj: None, n: int) -> None:
            for _ in range(n):
                store.restore(path)

        m = ctx.measure(batch, inner=1, repeats=ctx.pick(7, 2))
        expect(store.restore(path) == w.final, f"{peer}: restored pages differ from the live ones")
        return CaseOutcome(m, {"peer": peer})


# -- time travel at a random past LSN: read_page_at, replay_to_lsn, whole-version peers --

TT_FULL = (64, 5_000)
"""Pages of 1 KiB and writes of 64 B of the time-travel workload (full run)."""


def _tt_workload(ctx: RunContext) -> Workload:
    return make_workload(ctx, key="tt_workload", full=TT_FULL)


def _tt_probes(ctx: RunContext, w: Workload) -> list[int]:
    """Random past updates whose result the reads ask for (the same for every store)."""
    rng = np.random.default_rng(ctx.seed + 301)
    return [int(i) for i in rng.integers(0, w.n, ctx.pick(2_000, 20))]


def _tt_mmsb(ctx: RunContext) -> tuple[Any, list[int], list[int], Workload]:
    """A state holding the workload as ``write_page`` calls: (state, page ids, the LSN
    right after each update, workload). Built once per run."""
    if "tt_mmsb" not in ctx.cache:
        ctx.cache["tt_mmsb"] = _tt_fill(ctx, ctx.new_state())
    out: tuple[Any, list[int], list[int], Workload] = ctx.cache["tt_mmsb"]
    return out


def _tt_fill(ctx: RunContext, state: Any) -> tuple[Any, list[int], list[int], Workload]:
    """The workload written into ``state`` one ``write_page`` call per update: (state,
    page ids, the LSN right after each update, workload)."""
    import mmsb

    w = _tt_workload(ctx)
    ids = [p.id for p in mmsb.create_pages(state, w.pages, PAGE)]
    lsns: list[int] = []
    for p, off, data in zip(w.pids, w.offsets, w.regions, strict=True):
        mmsb.write_page(state, ids[p], off, data)
        lsns.append(int(state.last_lsn))
    return state, ids, lsns, w


@case("peers", "read_page_at_mmsb",
      "MMSB read_page_at: one 1 KiB page at a random past LSN (64 pages, 5,000 writes of 64 B)")
def _read_page_at_mmsb(ctx: RunContext) -> CaseOutcome:
    import mmsb

    state, ids, lsns, w = _tt_mmsb(ctx)
    probes = _tt_probes(ctx, w)
    args = [(ids[w.pids[i]], lsns[i]) for i in probes]
    read = mmsb.read_page_at
    t0 = time.perf_counter_ns()
    for pid, lsn in args:  # the first read of each page builds its keyframes
        read(state, pid, lsn=lsn)
    first_pass = time.perf_counter_ns() - t0
    m_args = len(args)

    def batch(_obj: None, n: int) -> None:
        for k in range(n):
            pid, lsn = args[k % m_args]
            read(state, pid, lsn=lsn)

    m = ctx.measure(batch, max_inner=ctx.pick(10_000, 20))
    for i, (pid, lsn) in zip(probes, args, strict=True):
        expect(read(state, pid, lsn=lsn) == w.fulls[i], "read_page_at returned the wrong bytes")
    return CaseOutcome(m, {"pages": w.pages, "writes": w.n, "probes": m_args,
                           "first_pass_ns_per_read": first_pass / m_args})


@case("peers", "read_version_sqlite",
      "SQLite: one whole stored version by its (page, version) primary key (same workload)")
def _read_version_sqlite(ctx: RunContext) -> CaseOutcome:
    w = _tt_workload(ctx)
    probes = _tt_probes(ctx, w)
    directory = _fresh_dir(ctx, "tt-sqlite")
    directory.mkdir(parents=True, exist_ok=True)
    con = SQLiteStore._open(directory / "versions.sqlite")
    ctx.on_close(con.close)
    con.execute("CREATE TABLE versions (page INTEGER, version INTEGER, data BLOB, "
                "PRIMARY KEY (page, version)) WITHOUT ROWID")
    con.execute("BEGIN")
    con.executemany("INSERT INTO versions VALUES (?, ?, ?)",
                    zip(w.pids, w.versions, w.fulls, strict=True))
    con.execute("COMMIT")
    args = [(w.pids[i], w.versions[i]) for i in probes]
    m_args = len(args)
    sql = "SELECT data FROM versions WHERE page = ? AND version = ?"
    execute = con.execute

    def batch(_obj: None, n: int) -> None:
        for k in range(n):
            execute(sql, args[k % m_args]).fetchone()

    m = ctx.measure(batch, max_inner=ctx.pick(10_000, 20))
    for i, a in zip(probes, args, strict=True):
        expect(execute(sql, a).fetchone()[0] == w.fulls[i], "sqlite returned the wrong version")
    return CaseOutcome(m, {"pages": w.pages, "writes": w.n, "probes": m_args})


@case("peers", "read_version_lmdb",
      "LMDB: one whole stored version by its (page, version) key (same workload)")
def _read_version_lmdb(ctx: RunContext) -> CaseOutcome:
    missing = _lmdb_missing()
    if missing is not None:
        raise CaseSkipped(missing)
    import lmdb

    w = _tt_workload(ctx)
    probes = _tt_probes(ctx, w)
    directory = _fresh_dir(ctx, "tt-lmdb")
    directory.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(directory), map_size=1 << 32, sync=False, metasync=False)
    ctx.on_close(env.close)
    with env.begin(write=True) as txn:
        for p, v, data in zip(w.pids, w.versions, w.fulls, strict=True):
            txn.put(_lmdb_key(p, v), data)
    keys = [_lmdb_key(w.pids[i], w.versions[i]) for i in probes]
    m_keys = len(keys)
    begin = env.begin

    def batch(_obj: None, n: int) -> None:
        for k in range(n):
            with begin() as txn:
                txn.get(keys[k % m_keys])

    m = ctx.measure(batch, max_inner=ctx.pick(10_000, 20))
    with begin() as txn:
        for i, key in zip(probes, keys, strict=True):
            expect(txn.get(key) == w.fulls[i], "lmdb returned the wrong version")
    return CaseOutcome(m, {"pages": w.pages, "writes": w.n, "probes": m_keys})


@case("replay", "to_lsn_64x1k",
      "replay_to_lsn at a random past LSN: 64 pages of 1 KiB, 5,000 writes of 64 B")
def _replay_to_lsn_64x1k(ctx: RunContext) -> CaseOutcome:
    return _tt_replay_to_lsn(ctx, _tt_mmsb)


def _tt_durable(ctx: RunContext) -> tuple[Any, list[int], list[int], Workload]:
    """:func:`_tt_mmsb`'s workload on a durable bus (``fsync="none"``, no checkpoint:
    the whole history in its log, read from its segments)."""
    if "tt_durable" not in ctx.cache:
        import mmsb

        state = mmsb.mmsb_start(path=ctx.path("tt-durable"), enable_gpu=False,
                                config=ctx.mmsb_config(fsync="none"))
        ctx.on_close(lambda: mmsb.mmsb_stop(state))
        ctx.cache["tt_durable"] = _tt_fill(ctx, state)
    out: tuple[Any, list[int], list[int], Workload] = ctx.cache["tt_durable"]
    return out


def _tt_reopened(ctx: RunContext) -> tuple[Any, list[int], list[int], Workload]:
    """:func:`_tt_durable`'s bus stopped as a crash leaves it (no final checkpoint) and
    reopened: the history is the rows recovery replayed from its segments (mapped)."""
    if "tt_reopened" not in ctx.cache:
        import mmsb

        path = ctx.path("tt-reopened")
        config = ctx.mmsb_config(fsync="none")
        state = mmsb.mmsb_start(path=path, enable_gpu=False, config=config)
        _state, ids, lsns, w = _tt_fill(ctx, state)
        bus = state.bus
        assert bus is not None
        bus.abandon("the history is to be read back as a crash leaves it")
        mmsb.mmsb_stop(state)
        state = mmsb.mmsb_start(path=path, enable_gpu=False, config=config)
        ctx.on_close(lambda: mmsb.mmsb_stop(state))
        ctx.cache["tt_reopened"] = (state, ids, lsns, w)
    out: tuple[Any, list[int], list[int], Workload] = ctx.cache["tt_reopened"]
    return out


def _tt_read_page_at(ctx: RunContext, fixture: Any) -> CaseOutcome:
    """read_page_at of one page at random past LSNs of the bus ``fixture(ctx)`` gives."""
    import mmsb

    state, ids, lsns, w = fixture(ctx)
    probes = _tt_probes(ctx, w)
    args = [(ids[w.pids[i]], lsns[i]) for i in probes]
    read = mmsb.read_page_at
    for pid, lsn in args:  # the first read of each page builds its keyframes
        read(state, pid, lsn=lsn)
    m_args = len(args)

    def batch(_obj: None, n: int) -> None:
        for k in range(n):
            pid, lsn = args[k % m_args]
            read(state, pid, lsn=lsn)

    m = ctx.measure(batch, max_inner=ctx.pick(10_000, 20))
    for i, (pid, lsn) in zip(probes, args, strict=True):
        expect(read(state, pid, lsn=lsn) == w.fulls[i], "read_page_at returned the wrong bytes")
    return CaseOutcome(m, {"pages": w.pages, "writes": w.n, "probes": m_args})


def _tt_replay_to_lsn(ctx: RunContext, fixture: Any) -> CaseOutcome:
    """replay_to_lsn at random past LSNs of the bus ``fixture(ctx)`` gives."""
    import mmsb

    state, ids, lsns, w = fixture(ctx)
    probes = _tt_probes(ctx, w)[: ctx.pick(200, 5)]
    targets = [lsns[i] for i in probes]
    m_targets = len(targets)
    replay = mmsb.replay_to_lsn
    for lsn in targets:  # the first replays build the pages' keyframes
        replay(state, lsn)

    def batch(_obj: None, n: int) -> None:
        for k in range(n):
            replay(state, targets[k % m_targets])

    m = ctx.measure(batch, max_inner=ctx.pick(200, 5))
    i = probes[0]
    past = replay(state, lsns[i])
    expect(mmsb.query_page(past, ids[w.pids[i]]) == w.fulls[i],
           "replay_to_lsn returned the wrong bytes")
    expect(past.last_lsn == lsns[i], "replay_to_lsn stopped at the wrong record")
    return CaseOutcome(m, {"pages": w.pages, "writes": w.n})


@case("replay", "read_page_at_reopened",
      "as read_page_at_durable, on the bus reopened after a crash (the history replayed "
      "from its segments at the open, read through their mappings)")
def _read_page_at_reopened(ctx: RunContext) -> CaseOutcome:
    return _tt_read_page_at(ctx, _tt_reopened)


@case("replay", "to_lsn_reopened",
      "as to_lsn_durable, on the bus reopened after a crash (see read_page_at_reopened)")
def _replay_to_lsn_reopened(ctx: RunContext) -> CaseOutcome:
    return _tt_replay_to_lsn(ctx, _tt_reopened)


@case("replay", "read_page_at_durable",
      "read_page_at of one 1 KiB page at a random past LSN on a durable bus (64 pages, "
      "5,000 writes of 64 B, the history in its log segments)")
def _read_page_at_durable(ctx: RunContext) -> CaseOutcome:
    return _tt_read_page_at(ctx, _tt_durable)


@case("replay", "to_lsn_durable",
      "replay_to_lsn at a random past LSN on a durable bus (64 pages of 1 KiB, 5,000 "
      "writes of 64 B, the history in its log segments)")
def _replay_to_lsn_durable(ctx: RunContext) -> CaseOutcome:
    return _tt_replay_to_lsn(ctx, _tt_durable)


for _peer in PEERS:
    _update_case(_peer)
for _peer in PEERS:
    _time_travel_case(_peer)
for _peer in PEERS:
    _checkpoint_case(_peer)
for _peer in PEERS:
    _restore_case(_peer)


PEER_METRICS: tuple[tuple[str, str, str], ...] = (
    ("update", "update (per update)", "median_ns"),
    ("storage", "history storage", "storage_bytes"),
    ("time_travel", "time-travel read", "median_ns"),
    ("checkpoint", "checkpoint", "median_ns"),
    ("restore", "restore + read all", "median_ns"),
)
"""(row key, label, where the value comes from). Lower is better for all of them."""


def peer_ratios(cases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """For each metric and peer: value, MMSB's value, and MMSB / peer (< 1: MMSB wins)."""
    rows: list[dict[str, Any]] = []
    for metric, label, source in PEER_METRICS:
        case_of = "update" if metric == "storage" else metric
        values: dict[str, float] = {}
        for peer in PEERS:
            rec = cases.get(f"peers/{case_of}_{peer}")
            if not rec or rec.get("status") != "ok":
                continue
            value = rec.get(source) if source == "median_ns" else rec["metrics"].get(source)
            if isinstance(value, int | float):
                values[peer] = float(value)
        base = values.get("mmsb")
        for peer in PEERS:
            if peer not in values:
                rec = cases.get(f"peers/{case_of}_{peer}") or {}
                rows.append(
                    {
                        "metric": metric,
                        "label": label,
                        "peer": peer,
                        "value": None,
                        "mmsb": base,
                        "ratio": None,
                        "note": rec.get("reason", "not run"),
                    }
                )
                continue
            value = values[peer]
            rows.append(
                {
                    "metric": metric,
                    "label": label,
                    "peer": peer,
                    "value": value,
                    "mmsb": base,
                    "ratio": (base / value) if base is not None and value > 0 else None,
                    "note": None,
                }
            )
    return rows
