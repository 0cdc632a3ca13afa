"""Replication through Redis: how far behind a follower runs, how fast it applies, and
what replication adds to a durable write on the leader.

Every case starts its own ``redis-server`` (a free localhost port, a temporary folder,
AOF on with ``appendfsync always`` as docs/Replication.md advises) and stops it after.
Followers that must not share the leader's interpreter run in a child process. Without
``redis-server`` on the PATH or redis-py installed the cases are skipped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from typing import Any

from ._harness import Measurement, summarize
from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect

_RECORD_BYTES = 64
_PAYLOADS = [bytes([v]) * _RECORD_BYTES for v in range(1, 252)]
"""Write i puts _PAYLOADS[i % 251] at slot i % 63 of a 4 KiB page: every write changes
its bytes (63 and 251 share no factor), so every write is logged."""


def _write(state: Any, page: int, i: int) -> None:
    import mmsb

    mmsb.write_page(state, page, (i % 63) * _RECORD_BYTES, _PAYLOADS[i % 251])


def _redis_missing() -> str | None:
    """Why the replication cases cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on the PATH"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'mmsb[replicate]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis(ctx: RunContext, name: str) -> str:
    """Start a redis-server for this case (stopped when the run ends); its URL."""
    reason = _redis_missing()
    if reason is not None:
        raise CaseSkipped(reason)
    import redis

    server = shutil.which("redis-server")
    assert server is not None
    folder = ctx.path(f"redis-{name}")
    folder.mkdir()
    for _attempt in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                up = bool(client.ping())
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        client.close()
        if up:
            def stop(proc: subprocess.Popen[bytes] = proc) -> None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

            ctx.on_close(stop)
            return f"redis://127.0.0.1:{port}/0"
        proc.kill()
        proc.wait()  # the port was taken meanwhile: try another
    raise RuntimeError("redis-server did not start")


def _leader(ctx: RunContext, name: str, url: str | None, ack: str = "local") -> Any:
    import mmsb

    extra: dict[str, Any] = {} if url is None else {"replicate_to": url, "ack": ack}
    cfg = ctx.mmsb_config(fsync="batch", checkpoint_interval=0, **extra)
    state = mmsb.mmsb_start(enable_gpu=False, config=cfg, path=ctx.path(name))
    ctx.on_close(lambda: mmsb.mmsb_stop(state))
    return state


def _head_lsn(url: str, bus_id: int) -> int:
    """The newest LSN the leader of ``bus_id`` has shipped to Redis."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.hget(f"mmsb:{bus_id:016x}:head", "lsn") or 0)
    finally:
        client.close()


def _wait_shipped(url: str, bus_id: int, lsn: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _head_lsn(url, bus_id) < lsn:
        expect(time.monotonic() < deadline, f"the leader did not ship LSN {lsn}")
        time.sleep(0.005)


_FOLLOWER_CHILD = r"""
import sys
import mmsb
url, bus, path, lsn = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
f = mmsb.follow(url, bus, path, config=mmsb.MMSBConfig(enable_gpu=False, checkpoint_interval=0))
ok = f.wait_for(lsn, 30)
print("ready" if ok else "late", f.applied_lsn, flush=True)
sys.stdin.readline()
f.close()
"""


def _follower_process(ctx: RunContext, url: str, bus_id: int, name: str, lsn: int) -> Any:
    """A follower of ``bus_id`` in a child process, once it has applied ``lsn``."""
    from .cases_memory import start_child

    return start_child(ctx, _FOLLOWER_CHILD, [url, f"{bus_id:016x}", str(ctx.path(name)),
                                              str(lsn)], "follower")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@case("replication", "lag",
      "follower lag: the leader (fsync=\"batch\", ack=\"local\") writes 64 B at a steady "
      "500 writes/s; a follower runs in another process; here, the time from a write's "
      "return on the leader to mmsb.attach(follower dir).wait_for(its LSN) returning; "
      "p50, p99")
def lag(ctx: RunContext) -> CaseOutcome:
    import mmsb

    url = _redis(ctx, "lag")
    state = _leader(ctx, "lag-leader", url)
    page = mmsb.create_page(state, 4096).id
    bus_id = state.bus.bus_id
    base = state.last_lsn
    _follower_process(ctx, url, bus_id, "lag-follower", base)
    reader = mmsb.attach(ctx.path("lag-follower"))
    ctx.on_close(reader.close)
    writes = ctx.pick(2000, 40)
    gap_ns = 2_000_000
    returned = [0] * writes
    done = [threading.Event() for _ in range(writes)]

    def writer() -> None:
        nxt = time.perf_counter_ns()
        for i in range(writes):
            _write(state, page, i)
            returned[i] = time.perf_counter_ns()
            done[i].set()
            nxt += gap_ns
            pause = nxt - time.perf_counter_ns()
            if pause > 0:
                time.sleep(pause / 1e9)

    thread = threading.Thread(target=writer, name="bench-repl-writer", daemon=True)
    lags: list[float] = []
    thread.start()
    try:
        for i in range(writes):
            expect(reader.wait_for(base + i + 1, timeout=30),
                   f"the follower did not apply LSN {base + i + 1}")
            seen = time.perf_counter_ns()
            done[i].wait(30)
            # Applied before the leader's call returned counts as no lag.
            lags.append(float(max(1, seen - returned[i])))
    finally:
        thread.join(timeout=60)
    expect(state.last_lsn == base + writes, "a write was not logged")
    expect(reader.read_page(page) == mmsb.query_page(state, page),
           "the follower holds other bytes than the leader")
    stats = summarize(lags, 1)
    return CaseOutcome(Measurement(stats, samples_ns=tuple(lags)), {
        "writes": writes,
        "rate_per_s": 1e9 / gap_ns,
        "p50_us": stats.median_ns / 1e3,
        "p99_us": _percentile(lags, 0.99) / 1e3,
        "max_us": stats.max_ns / 1e3,
    })


@case("replication", "follower_apply",
      "follower apply rate: a leader writes N 64 B records (ack=\"local\", one frame each) "
      "with no follower; a follower (this process, the leader idle) bootstraps from the "
      "checkpoint published before them and applies, logs and syncs them all; records/s")
def follower_apply(ctx: RunContext) -> CaseOutcome:
    import mmsb

    url = _redis(ctx, "apply")
    state = _leader(ctx, "apply-leader", url)
    bus_id = state.bus.bus_id
    start_lsn = state.last_lsn
    # The leader published its checkpoint at start_lsn when it claimed its term; every
    # write below stays in the stream for a follower to apply.
    _wait_published(url, bus_id)
    page = mmsb.create_page(state, 4096).id
    n = ctx.pick(40_000, 500)
    for i in range(n):
        _write(state, page, i)
    last = state.last_lsn
    expect(last == start_lsn + 1 + n, "a write was not logged")
    _wait_shipped(url, bus_id, last)
    records = last - start_lsn
    samples: list[float] = []
    stats: dict[str, int] = {}
    for k in range(ctx.pick(2, 1)):
        t0 = time.perf_counter_ns()
        f = mmsb.follow(url, bus_id, ctx.path(f"apply-follower-{k}"),
                        config=ctx.mmsb_config(checkpoint_interval=0))
        try:
            expect(f.wait_for(last, timeout=120), "the follower did not catch up")
            samples.append(float(time.perf_counter_ns() - t0))
            expect(f.read_page(page) == mmsb.query_page(state, page),
                   "the follower holds other bytes than the leader")
            stats = dict(f.stats)
        finally:
            f.close()
    expect(stats.get("bootstraps") == 1 and stats.get("records") == records,
           f"the follower did not apply the stream from the first checkpoint ({stats})")
    per_record = [s / records for s in samples]
    m = Measurement(summarize(per_record, records), samples_ns=tuple(per_record))
    return CaseOutcome(m, {
        "records": records,
        "records_per_s": 1e9 / m.stats.median_ns,
    })


def _wait_published(url: str, bus_id: int, timeout: float = 30.0) -> None:
    """Until the leader's first checkpoint is in Redis."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while not client.zcard(f"mmsb:{bus_id:016x}:ckpts"):
            expect(time.monotonic() < deadline, "the leader published no checkpoint")
            time.sleep(0.005)
    finally:
        client.close()


@case("replication", "leader_write",
      "write_page (64 B) on a durable leader, fsync=\"batch\": with ack=\"replicas:1\" (one "
      "follower in another process), against the same write without replication and with "
      "ack=\"local\", interleaved in rounds; ratios to the write without replication")
def leader_write(ctx: RunContext) -> CaseOutcome:
    import mmsb

    url = _redis(ctx, "write")
    plain = _leader(ctx, "write-plain", None)
    local = _leader(ctx, "write-local", url, "local")
    acked = _leader(ctx, "write-acked", url, "replicas:1")
    _follower_process(ctx, url, acked.bus.bus_id, "write-follower", acked.last_lsn)
    states = (plain, local, acked)
    pages = [mmsb.create_page(s, 4096).id for s in states]
    per_round = ctx.pick(200, 10)
    rounds = ctx.pick(7, 2)
    samples: list[list[float]] = [[], [], []]
    counter = [0]

    def run(i: int) -> float:
        s, pid = states[i], pages[i]
        k = counter[0]
        t0 = time.perf_counter_ns()
        for j in range(k, k + per_round):
            _write(s, pid, j)
        return (time.perf_counter_ns() - t0) / per_round

    for i in range(3):
        run(i)  # warm-up
    counter[0] += per_round
    for _ in range(rounds):
        for i in range(3):
            samples[i].append(run(i))
        counter[0] += per_round
    logged = [s.last_lsn for s in states]
    expect(len(set(logged)) == 1, f"the three buses logged different counts: {logged}")
    medians = [summarize(s, per_round).median_ns for s in samples]
    m = Measurement(summarize(samples[2], per_round), samples_ns=tuple(samples[2]))
    return CaseOutcome(m, {
        "plain_ns": medians[0],
        "ack_local_ns": medians[1],
        "ack_replicas1_ns": medians[2],
        "local_vs_plain": medians[1] / medians[0],
        "replicas1_vs_plain": medians[2] / medians[0],
    })
