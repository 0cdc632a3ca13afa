"""The durable bus: append throughput per fsync mode, and recovery time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect

_RECORD_BYTES = 64


def _open(ctx: RunContext, name: str, fsync: str) -> Any:
    import mmsb

    cfg = ctx.mmsb_config(fsync=fsync, checkpoint_interval=0)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=ctx.path(name))
    ctx.on_close(lambda: mmsb.mmsb_stop(state))
    return state


def _append_case(ctx: RunContext, fsync: str) -> CaseOutcome:
    """write_page of 64 changed bytes per call on a durable bus."""
    import mmsb

    state = _open(ctx, f"append-{fsync}", fsync)
    page = mmsb.create_page(state, 4096).id
    rng = np.random.default_rng(ctx.seed)
    payloads = [rng.integers(1, 256, _RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(64)]
    counter = [0]

    def batch(_obj: None, n: int) -> None:
        write = mmsb.write_page
        k = counter[0]
        for i in range(n):
            write(state, page, ((k + i) * _RECORD_BYTES) % 4032, payloads[(k + i) & 63])
        counter[0] = k + n

    m = ctx.measure(batch, max_inner=ctx.pick(2000 if fsync == "always" else 200_000, 50))
    per_op_s = m.stats.median_ns / 1e9
    return CaseOutcome(m, {
        "fsync": fsync,
        "records_per_s": 1 / per_op_s,
        "mb_per_s": _RECORD_BYTES / per_op_s / 1e6,
    })


@case("durable", "append_always", "write_page (64 B) on a durable bus, fsync=\"always\"")
def append_always(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "always")


@case("durable", "append_batch", "write_page (64 B) on a durable bus, fsync=\"batch\" (group commit)")
def append_batch(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "batch")


@case("durable", "append_none", "write_page (64 B) on a durable bus, fsync=\"none\"")
def append_none(ctx: RunContext) -> CaseOutcome:
    return _append_case(ctx, "none")


def _recovery_case(ctx: RunContext, name: str, every: int | None) -> CaseOutcome:
    """Recover a bus of 100 pages after 100k 8-byte writes (ten apply_batch calls),
    all still in the write-ahead log (``every`` None), or checkpointed every ``every``
    records so that recovery reads a chain of checkpoints' log sections."""
    import mmsb

    n_records = ctx.pick(100_000, 2_000)
    path = ctx.path(name)
    extra = {} if every is None else {"max_tlog_size": ctx.pick(every, 500)}
    cfg = ctx.mmsb_config(fsync="none", checkpoint_interval=0, **extra)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=path)
    pages = [p.id for p in mmsb.create_pages(state, 100, 1024)]
    rng = np.random.default_rng(ctx.seed + 1)
    offsets = rng.integers(0, 1016, n_records).tolist()
    values = rng.integers(1, 256, (n_records, 8), dtype=np.uint8)
    writes = [(pages[i % 100], offsets[i], values[i].tobytes()) for i in range(n_records)]
    step = ctx.pick(10_000, 200)
    for start in range(0, n_records, step):
        mmsb.apply_batch(state, writes[start : start + step])
    logged = state.last_lsn
    # Leave what followed the last checkpoint in the log, as a crash would: no
    # checkpoint at stop.
    assert state.bus is not None
    state.bus.flush()
    state.bus.records_since_ckpt = 0
    mmsb.mmsb_stop(state)
    checkpoints = len(list((path / "checkpoints").glob("ckpt-*.mmsb")))

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            recovered = mmsb.open_readonly(path, config=cfg)
            expect(recovered.last_lsn == logged, "recovery lost records")
            expect(len(recovered.log.records) == logged, "recovery lost history")

    m = ctx.measure(batch, inner=1, repeats=ctx.pick(5, 2))
    return CaseOutcome(m, {
        "records": n_records,
        "checkpoints": checkpoints,
        "records_per_s": n_records / (m.stats.median_ns / 1e9),
    })


@case("durable", "recovery_100k", "recover a bus whose log holds 100k records after its checkpoint")
def recovery_100k(ctx: RunContext) -> CaseOutcome:
    return _recovery_case(ctx, "recovery", None)


@case("durable", "recovery_100k_chain",
      "recover a bus whose 100k records lie in a chain of checkpoints (one per 10k records)")
def recovery_100k_chain(ctx: RunContext) -> CaseOutcome:
    return _recovery_case(ctx, "recovery-chain", 10_000)


def _bytes_written() -> int | None:
    """Bytes this process has handed to write calls so far (Linux ``wchar``)."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@case("durable", "checkpoint_few_changed",
      "checkpoint a bus of 10,000 pages of 1 KiB after 8-byte writes to 10 of them")
def checkpoint_few_changed(ctx: RunContext) -> CaseOutcome:
    """The cost of one checkpoint when few pages changed since the last: its time (the
    write and fsyncs of whatever it writes, and the removal of the checkpoint that
    ``retain_checkpoints=2`` evicts) and the bytes it hands to write calls."""
    import mmsb

    n_pages = ctx.pick(10_000, 200)
    changed = 10
    cfg = ctx.mmsb_config(fsync="batch", checkpoint_interval=0, retain_checkpoints=2)
    state = mmsb.mmsb_start(config=cfg, path=ctx.path("checkpoint-few"))
    ctx.on_close(lambda: mmsb.mmsb_stop(state))
    ids = [p.id for p in mmsb.create_pages(state, n_pages, 1024)]
    rng = np.random.default_rng(ctx.seed + 2)
    fill = rng.integers(0, 256, (n_pages, 1024), dtype=np.uint8)
    for start in range(0, n_pages, 1000):
        mmsb.apply_batch(state, [(ids[i], 0, fill[i].tobytes())
                                 for i in range(start, min(n_pages, start + 1000))])
    assert state.bus is not None
    bus = state.bus
    with state.lock:
        bus.checkpoint(state)
    rounds = [0]
    written: list[int] = []

    def setup(_n: int) -> None:
        k = rounds[0]
        rounds[0] = k + 1
        mmsb.apply_batch(state, [(ids[(k * 131 + j * 997) % n_pages], (k * 8) % 1016,
                                  rng.integers(1, 256, 8, dtype=np.uint8).tobytes())
                                 for j in range(changed)])

    def batch(_obj: None, n: int) -> None:
        for _ in range(n):
            before = _bytes_written()
            with state.lock:
                bus.checkpoint(state)
            after = _bytes_written()
            if before is not None and after is not None:
                written.append(after - before)

    m = ctx.measure(batch, setup=setup, inner=1, repeats=ctx.pick(15, 3))
    return CaseOutcome(m, {
        "pages": n_pages,
        "changed_pages": changed,
        "page_bytes": n_pages * 1024,
        "bytes_written": float(np.median(written)) if written else None,
    })


# -- readers in other processes ----------------------------------------------------------

_WRITER_CHILD = r"""
import sys, time
import mmsb
path, pages, writes, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = mmsb.mmsb_start(path=path, enable_gpu=False,
                    config=mmsb.MMSBConfig(fsync="none", checkpoint_interval=0))
ids = [mmsb.create_page(s, 1024).id for _ in range(pages)]
for i in ids:
    mmsb.write_page(s, i, 0, i.to_bytes(4, "little"))
print("ready", s.last_lsn, flush=True)
sys.stdin.readline()
for k in range(writes):
    mmsb.write_page(s, ids[k % pages], 8, (k + 1).to_bytes(8, "little"))
    time.sleep(gap)
print("done", flush=True)
sys.stdin.readline()
mmsb.mmsb_stop(s)
"""


def _writer(ctx: RunContext, name: str, pages: int, writes: int, gap: float) -> Any:
    from .cases_memory import start_child

    return start_child(ctx, _WRITER_CHILD, [str(ctx.path(name)), str(pages), str(writes),
                                            str(gap)], "writer", "\n\n")


@case("durable", "attach_read_1k",
      "read one 1 KiB page from a bus another process writes (mmsb.attach); SQLite WAL "
      "and LMDB reads of a 1 KiB value by key, same run")
def attach_read_1k(ctx: RunContext) -> CaseOutcome:
    import sqlite3

    import mmsb

    pages = 64
    _writer(ctx, "attach-read", pages, 0, 0.0)
    reader = mmsb.attach(ctx.path("attach-read"))
    ctx.on_close(reader.close)
    rng = np.random.default_rng(ctx.seed)
    order = [int(x) for x in rng.integers(1, pages + 1, 4096)]

    def batch(_obj: None, n: int) -> None:
        read = reader.read_page
        for i in range(n):
            read(order[i & 4095])

    m = ctx.measure(batch, max_inner=ctx.pick(1_000_000, 200))
    for pid in (1, pages):
        expect(reader.read_page(pid)[:4] == pid.to_bytes(4, "little"), "wrong bytes read")
    metrics: dict[str, Any] = {"pages": pages}
    # Peers: a 1 KiB value by primary key from a reader connection.
    db = ctx.path("attach-read.sqlite")
    w = sqlite3.connect(db)
    w.execute("PRAGMA journal_mode=WAL")
    w.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, data BLOB)")
    w.executemany("INSERT INTO p VALUES (?, ?)", [(i, bytes(1024)) for i in range(1, pages + 1)])
    w.commit()
    r = sqlite3.connect(db)
    q = "SELECT data FROM p WHERE id = ?"

    def sq(_obj: None, n: int) -> None:
        ex = r.execute
        for i in range(n):
            ex(q, (order[i & 4095],)).fetchone()

    metrics["sqlite_median_ns"] = ctx.measure(sq, max_inner=ctx.pick(200_000, 100)).stats.median_ns
    r.close()
    w.close()
    try:
        import lmdb
    except ImportError:
        metrics["lmdb_median_ns"] = None
    else:
        env = lmdb.open(str(ctx.path("attach-read.lmdb")), map_size=1 << 26, sync=False)
        with env.begin(write=True) as txn:
            for i in range(1, pages + 1):
                txn.put(i.to_bytes(8, "big"), bytes(1024))
        keys = [k.to_bytes(8, "big") for k in order]

        def lm(_obj: None, n: int) -> None:
            for i in range(n):
                with env.begin() as t:
                    t.get(keys[i & 4095])

        metrics["lmdb_median_ns"] = ctx.measure(lm, max_inner=ctx.pick(500_000, 100)).stats.median_ns
        env.close()
    return CaseOutcome(m, metrics)


@case("durable", "feed_latency",
      "change feed across processes: from a write in another process to its event here "
      "(changes(follow=True)); p50, p99, and the follower's CPU while idle")
def feed_latency(ctx: RunContext) -> CaseOutcome:
    import time

    import mmsb

    from ._harness import Measurement, summarize

    writes = ctx.pick(2000, 50)
    proc = _writer(ctx, "feed", 8, writes, 0.0005)
    reader = mmsb.attach(ctx.path("feed"))
    ctx.on_close(reader.close)
    start = reader.last_lsn
    # Idle cost: follow for a while with nothing written.
    cpu0, wall0 = time.process_time(), time.monotonic()
    idle = list(reader.changes(start, follow=True, timeout=ctx.pick(1.0, 0.1)))
    idle_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    expect(idle == [], "events while the writer was idle")
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    lat: list[float] = []
    for ev in reader.changes(start, follow=True, timeout=10):
        lat.append(time.time_ns() - ev.timestamp)
        if len(lat) == writes:
            break
    expect(len(lat) == writes, f"{len(lat)} of {writes} events arrived")
    stats = summarize(lat, 1)
    ordered = sorted(lat)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return CaseOutcome(Measurement(stats), {
        "events": writes, "p50_ns": stats.median_ns, "p99_ns": p99,
        "idle_cpu_fraction": idle_cpu})


# -- side by side with SQLite and LMDB ----------------------------------------------------

_KILLED_CHILD = r"""
import os, signal, sys
import numpy as np
import mmsb
path, n = sys.argv[1], int(sys.argv[2])
s = mmsb.mmsb_start(path=path, enable_gpu=False, config=mmsb.MMSBConfig(fsync="none",
                    checkpoint_interval=0))
ids = [p.id for p in mmsb.create_pages(s, 64, 1024)]
rng = np.random.default_rng(5)
offs = rng.integers(0, 1016, n).tolist()
vals = rng.integers(1, 256, (n, 8), dtype=np.uint8)
for i in range(n):
    mmsb.write_page(s, ids[i % 64], offs[i], vals[i].tobytes())
print(s.last_lsn, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

_SQLITE_KILLED_CHILD = r"""
import os, signal, sqlite3, sys
import numpy as np
path, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA wal_autocheckpoint=1000")
db.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, data BLOB)")
db.executemany("INSERT INTO p VALUES (?, ?)", [(i, bytes(1024)) for i in range(64)])
db.commit()
rng = np.random.default_rng(5)
offs = rng.integers(0, 1016, n).tolist()
vals = rng.integers(1, 256, (n, 8), dtype=np.uint8)
pages = [bytearray(1024) for _ in range(64)]
for i in range(n):
    p = pages[i % 64]
    p[offs[i]:offs[i] + 8] = vals[i].tobytes()
    db.execute("UPDATE p SET data = ? WHERE id = ?", (bytes(p), i % 64))
    db.commit()
print(n, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _reopen_case(ctx: RunContext, records: int) -> CaseOutcome:
    """Reopen a bus whose writer was killed (SIGKILL) after ``records`` 8-byte writes to
    64 pages of 1 KiB, and read every page; SQLite (WAL, killed the same way after the
    same updates of 64 rows of 1 KiB) opened and read in the same run. Each side's
    figure is its open (``mmsb_start`` / ``sqlite3.connect``) and the read of all 64
    pages of 1 KiB (64 ``query_page`` calls / one ``SELECT`` of the 64 rows), timed
    from the same process state: files copied beforehand, right after a collection,
    the two sides alternating which goes first; medians of 11 opens each."""
    import gc
    import shutil
    import sqlite3
    import subprocess
    import sys
    import time

    import mmsb

    from ._harness import Measurement, summarize
    from .cases_memory import _child_env

    n = ctx.pick(records, 500)
    src = ctx.path(f"reopen-{records}")
    out = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(src), str(n)],
                         capture_output=True, text=True, env=_child_env())
    expect(out.stdout.strip().isdigit(), f"the writer did not run: {out.stderr[-300:]}")
    logged = int(out.stdout)
    db_src = ctx.path(f"reopen-{records}.sqlite")
    subprocess.run([sys.executable, "-c", _SQLITE_KILLED_CHILD, str(db_src), str(n)],
                   capture_output=True, text=True, env=_child_env())
    samples: list[float] = []
    sq: list[float] = []

    def open_mmsb(dst: Path) -> None:
        gc.collect()
        t0 = time.perf_counter_ns()
        s = mmsb.mmsb_start(path=dst, enable_gpu=False)
        pages = [mmsb.query_page(s, pid) for pid in sorted(s.pages)]
        samples.append(time.perf_counter_ns() - t0)
        expect(s.last_lsn == logged and len(pages) == 64, "the reopened bus lost records")
        mmsb.mmsb_stop(s)

    def open_sqlite(db_dst: Path) -> None:
        gc.collect()
        t0 = time.perf_counter_ns()
        db = sqlite3.connect(db_dst)
        rows = db.execute("SELECT data FROM p ORDER BY id").fetchall()
        sq.append(time.perf_counter_ns() - t0)
        expect(len(rows) == 64 and all(len(r[0]) == 1024 for r in rows), "sqlite lost rows")
        db.close()

    for k in range(ctx.pick(11, 2)):
        # Both copies are made first, and each side is timed right after a collection
        # (so that neither pays for the other's garbage, nor starts with caches the
        # other left warmer), in alternating order: the same process state for both.
        dst = ctx.path(f"reopen-{records}-{k}")
        shutil.copytree(src, dst)
        db_dst = ctx.path(f"reopen-{records}-{k}.sqlite")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(str(db_src) + suffix):
                shutil.copyfile(str(db_src) + suffix, str(db_dst) + suffix)
        if k % 2:
            open_sqlite(db_dst)
            open_mmsb(dst)
        else:
            open_mmsb(dst)
            open_sqlite(db_dst)
        # Both states go here, not inside the next timed open (which would otherwise
        # pay for releasing this one's history, or collecting its cycles).
        gc.collect()
    sq.sort()
    return CaseOutcome(Measurement(summarize(samples, 1)), {
        "records": logged, "sqlite_open_read_ns": sq[len(sq) // 2]})


@case("durable", "reopen_after_kill_10k",
      "reopen a bus after SIGKILL (10,000 writes, 64 pages of 1 KiB) and read every page; "
      "SQLite WAL open + read after the same, same run")
def reopen_after_kill_10k(ctx: RunContext) -> CaseOutcome:
    return _reopen_case(ctx, 10_000)


@case("durable", "crc32c_64k",
      "CRC32C of 64 KiB (the page store's 64 pages of 1 KiB that a reopen checks) by the "
      "compiled crc_update; the table version's time in the same run")
def crc32c_64k(ctx: RunContext) -> CaseOutcome:
    """One ``crc_update`` call over 64 KiB of random bytes: the version the kernels use
    (the CPU's ``crc32`` instruction where :data:`CRC_HARDWARE`), and the table version
    (slicing by 8) for comparison, both checked against the ``crc32c`` package."""
    import crc32c

    from .._core.kernels import CRC_HARDWARE, CRC_TABLES, crc_update, crc_update_tables

    buf = np.random.default_rng(ctx.seed).integers(0, 256, 1 << 16, dtype=np.uint8)
    want = crc32c.crc32c(buf.tobytes())
    for name, fn in (("crc_update", crc_update), ("crc_update_tables", crc_update_tables)):
        expect(int(fn(CRC_TABLES, 0xFFFFFFFF, buf, 0, buf.size)) ^ 0xFFFFFFFF == want,
               f"{name} differs from the crc32c package")

    def batch_with(fn: Any) -> Any:
        def batch(_obj: None, n: int) -> None:
            for _ in range(n):
                fn(CRC_TABLES, 0xFFFFFFFF, buf, 0, 65536)
        return batch

    m = ctx.measure(batch_with(crc_update), max_inner=ctx.pick(100_000, 10))
    tables = ctx.measure(batch_with(crc_update_tables), max_inner=ctx.pick(100_000, 10))
    chosen_ns = m.stats.median_ns
    return CaseOutcome(m, {"hardware": CRC_HARDWARE, "bytes": 65536,
                           "gb_per_s": 65536 / chosen_ns,
                           "tables_ns": tables.stats.median_ns,
                           "tables_over_chosen": tables.stats.median_ns / chosen_ns})


@case("durable", "reopen_after_kill_100k",
      "as reopen_after_kill_10k after 100,000 writes (the cost should not grow with history)")
def reopen_after_kill_100k(ctx: RunContext) -> CaseOutcome:
    return _reopen_case(ctx, 100_000)


def _lmdb_put_case(ctx: RunContext, sync: bool) -> CaseOutcome:
    """LMDB, one write transaction per 64-byte put into a 4 KiB value (the same work as
    durable/append_*: 64 changed bytes of a 4 KiB page per call)."""
    try:
        import lmdb
    except ImportError:
        raise CaseSkipped("lmdb is not installed (pip install 'mmsb[bench]')") from None
    env = lmdb.open(str(ctx.path(f"lmdb-put-{sync}")), map_size=1 << 30, sync=sync,
                    metasync=sync)
    ctx.on_close(env.close)
    page = bytearray(4096)
    rng = np.random.default_rng(ctx.seed)
    payloads = [rng.integers(1, 256, _RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(64)]
    counter = [0]

    def batch(_obj: None, n: int) -> None:
        k = counter[0]
        for i in range(n):
            off = ((k + i) * _RECORD_BYTES) % 4032
            page[off : off + _RECORD_BYTES] = payloads[(k + i) & 63]
            with env.begin(write=True) as txn:
                txn.put(b"page", bytes(page))
        counter[0] = k + n

    m = ctx.measure(batch, max_inner=ctx.pick(2000 if sync else 200_000, 50))
    return CaseOutcome(m, {"sync": sync})


@case("durable", "lmdb_put_nosync", "LMDB put of a 4 KiB value with 64 changed bytes, sync=False")
def lmdb_put_nosync(ctx: RunContext) -> CaseOutcome:
    return _lmdb_put_case(ctx, False)


@case("durable", "lmdb_put_sync", "LMDB put of a 4 KiB value with 64 changed bytes, sync=True")
def lmdb_put_sync(ctx: RunContext) -> CaseOutcome:
    return _lmdb_put_case(ctx, True)


def _sqlite_put_case(ctx: RunContext, synchronous: str) -> CaseOutcome:
    """SQLite in WAL mode, one autocommit ``UPDATE`` of a 4 KiB value with 64 changed
    bytes per call (the work of durable/append_* and durable/lmdb_put_*)."""
    import sqlite3

    db = sqlite3.connect(str(ctx.path(f"sqlite-put-{synchronous}.db")), isolation_level=None)
    ctx.on_close(db.close)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, data BLOB)")
    db.execute("INSERT INTO p VALUES (1, ?)", (bytes(4096),))
    page = bytearray(4096)
    rng = np.random.default_rng(ctx.seed)
    payloads = [rng.integers(1, 256, _RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(64)]
    counter = [0]
    sql = "UPDATE p SET data = ? WHERE id = 1"

    def batch(_obj: None, n: int) -> None:
        k = counter[0]
        ex = db.execute
        for i in range(n):
            off = ((k + i) * _RECORD_BYTES) % 4032
            page[off : off + _RECORD_BYTES] = payloads[(k + i) & 63]
            ex(sql, (bytes(page),))
        counter[0] = k + n

    m = ctx.measure(batch, max_inner=ctx.pick(2000 if synchronous == "FULL" else 200_000, 50))
    return CaseOutcome(m, {"synchronous": synchronous})


@case("durable", "sqlite_put_normal",
      "SQLite WAL, autocommit UPDATE of a 4 KiB value with 64 changed bytes, synchronous=NORMAL")
def sqlite_put_normal(ctx: RunContext) -> CaseOutcome:
    return _sqlite_put_case(ctx, "NORMAL")


@case("durable", "sqlite_put_full",
      "SQLite WAL, autocommit UPDATE of a 4 KiB value with 64 changed bytes, synchronous=FULL")
def sqlite_put_full(ctx: RunContext) -> CaseOutcome:
    return _sqlite_put_case(ctx, "FULL")
