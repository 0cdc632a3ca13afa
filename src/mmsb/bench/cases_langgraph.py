"""LangGraph checkpointers side by side: ``MMSBSaver`` against ``SqliteSaver``, same run.

The workload: one thread of ``N`` steps (500; 20 in smoke mode) whose ``messages``
channel grows by one LangChain message a step (human and AI in turn, pseudo-random
words, about 240 bytes each once serialized), saved as LangGraph's loop saves it: a
``put_writes`` of the node's new message against the previous checkpoint, then a
``put`` of the checkpoint with the conversation so far and the channel's new version.
Every checkpoint is built before timing, and both savers get the same ones.

| case | what is timed |
| --- | --- |
| ``put_own`` / ``put_own_sqlite`` | each ``put`` of fresh savers driven in turn with the values' encoding precomputed and no sync (MMSB ``fsync="none"``, SQLite ``synchronous=OFF``): what each saver does around LangGraph's encoding and the sync |
| ``put`` / ``put_always`` / ``put_memory`` / ``put_sqlite`` / ``put_sqlite_normal`` | each ``put`` of the thread, one sample per put, in runs of fresh savers driven step by step in turn: MMSB durable (``fsync="batch"``, its default), durable with ``fsync="always"`` (a sync per put, like SQLite's default ``synchronous=FULL`` in WAL mode), in memory; SQLite on a file with its defaults, and with ``synchronous=NORMAL`` (no sync per commit, as MMSB's ``fsync="batch"``) |
| ``get_latest`` / ``get_latest_sqlite`` | ``get_tuple`` of the thread's latest checkpoint, A/B interleaved (201 rounds) |
| ``get_middle`` / ``get_middle_sqlite`` | ``get_tuple`` of step ``N // 2``, A/B interleaved (201 rounds) |
| ``decode_middle`` | LangGraph's serializer decoding step ``N // 2``'s messages alone: the floor both savers share |
| ``encode_middle`` | LangGraph's serializer encoding step ``N // 2``'s checkpoint: the floor of a put at that step, which both savers pay |
| ``get_middle_storage`` / ``get_middle_storage_sqlite`` | ``get_tuple`` of step ``N // 2`` with a serializer that decodes nothing: what each saver does around LangGraph's decoding, A/B interleaved (201 rounds) |
| ``list_history`` / ``list_history_sqlite`` | ``list`` of the whole thread, A/B interleaved |
| ``reopen`` / ``reopen_sqlite`` | open the saver on its files and ``get_tuple`` the latest, A/B interleaved; the files' sizes (``disk_bytes``: the bus directory after ``close``, the SQLite file with its ``-wal`` and ``-shm``) are ``reopen``'s metrics |

Both savers use one serializer object, LangGraph's default (checked, and reported in the
put cases' metrics with SQLite's journal mode and ``synchronous`` setting): decoding the
messages into LangChain objects is most of every read, encoding them most of every put,
and it is the same work for both. The synced comparison is MMSB's ``fsync="always"``
(one ``fdatasync`` of the log per ``put``) against SQLite's defaults, WAL with
``synchronous=FULL`` (one ``fdatasync`` of the WAL per commit, a ``put`` being one
commit). The cyclic garbage collector is paused while an operation is timed.

The paired reads also report each side's CPU time (this thread's, user and system) and
its ratios (``cpu_ratio_to_sqlite``, ``cpu_ratio_per_round``): both sides do the same
in-memory work on one core, so on a machine other processes load, where the wall times
of a 2 ms read spread by tens of percent, the CPU times stay within a few. The two
clock reads add about 1 µs to each side's wall time.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

from ._harness import Measurement, summarize
from ._registry import CaseOutcome, CaseSkipped, RunContext, case, expect

_WORDS = ("state bus page delta epoch replay log graph agent tool message thread "
          "checkpoint version history channel node edge step value write read time "
          "travel fork branch record stream batch commit sync").split()


@dataclass(frozen=True, slots=True)
class Step:
    checkpoint: dict[str, Any]
    metadata: dict[str, Any]
    new_versions: dict[str, Any]
    message: Any


@dataclass(frozen=True, slots=True)
class Workload:
    steps: list[Step]
    thread: str

    @property
    def n(self) -> int:
        return len(self.steps)

    def config(self, i: int | None = None) -> Any:
        conf: dict[str, Any] = {"thread_id": self.thread, "checkpoint_ns": ""}
        if i is not None:
            conf["checkpoint_id"] = self.steps[i].checkpoint["id"]
        return {"configurable": conf}


def _require() -> None:
    try:
        import langchain_core.messages  # noqa: F401
        import langgraph.checkpoint.sqlite  # noqa: F401

        import mmsb.integrations.langgraph  # noqa: F401
    except ImportError as exc:
        raise CaseSkipped(f"LangGraph's checkpoint packages are not installed ({exc}); "
                          "pip install 'mmsb[bench]'") from None


def _workload(ctx: RunContext) -> Workload:
    if "lg_workload" in ctx.cache:
        w: Workload = ctx.cache["lg_workload"]
        return w
    _require()
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    n = ctx.pick(500, 20)
    rng = random.Random(ctx.seed + 700)
    messages: list[Any] = []
    steps = []
    start = f"{1:032}.{0.5:016}"
    for i in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(9))
        cls = HumanMessage if i % 2 == 0 else AIMessage
        msg = cls(content=text, id=f"msg-{i:05d}")
        messages.append(msg)
        version = f"{i + 2:032}.{rng.random():016}"
        cp: Any = empty_checkpoint()
        cp["id"] = str(uuid6(clock_seq=i))
        cp["channel_values"] = {"messages": list(messages)}
        cp["channel_versions"] = {"__start__": start, "messages": version}
        cp["versions_seen"] = {"agent": {"messages": version}}
        steps.append(Step(cp, {"source": "loop", "step": i, "parents": {}},
                          {"messages": version}, msg))
    w = Workload(steps, "conversation")
    ctx.cache["lg_workload"] = w
    return w


def _drive_all(savers: dict[str, Any], w: Workload) -> dict[str, list[float]]:
    """Save the whole thread on every saver, step by step in turn (the order rotating
    each step), so drift in the machine hits all alike; return each put's time (ns).
    The cyclic garbage collector is paused while a put is timed, as the harness does
    for every other timing, so a collection of objects the workload made does not land
    on whichever saver happens to run then."""
    import gc
    import time

    kinds = list(savers)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    configs = {k: w.config() for k in kinds}
    gc_was_enabled = gc.isenabled()
    for i, step in enumerate(w.steps):
        for j in range(len(kinds)):
            kind = kinds[(i + j) % len(kinds)]
            saver = savers[kind]
            if i:
                saver.put_writes(configs[kind], [("messages", [step.message])], f"task-{i}")
            gc.disable()
            try:
                t0 = time.perf_counter_ns()
                configs[kind] = saver.put(configs[kind], step.checkpoint, step.metadata,
                                          step.new_versions)
                times[kind].append(float(time.perf_counter_ns() - t0))
            finally:
                if gc_was_enabled:
                    gc.enable()
    return times


def _open_mmsb(path: Path | None, fsync: str = "batch") -> Any:
    import mmsb
    from mmsb.integrations.langgraph import MMSBSaver

    if fsync == "batch":
        return MMSBSaver(path)
    return MMSBSaver(path, config=mmsb.MMSBConfig(fsync=fsync, max_tlog_size=1 << 20,
                                                 checkpoint_interval=0))


class _Sqlite:
    """A ``SqliteSaver`` on a file, with its connection."""

    def __init__(self, path: Path, serde: Any = None) -> None:
        from langgraph.checkpoint.sqlite import SqliteSaver

        self.path = path
        self.conn = sqlite3.connect(str(path), check_same_thread=False)
        self.saver = SqliteSaver(self.conn, serde=serde)

    def close(self) -> None:
        self.conn.close()


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sqlite_bytes(path: Path) -> int:
    return sum(_du(Path(str(path) + suffix)) for suffix in ("", "-wal", "-shm")
               if Path(str(path) + suffix).exists())


_KINDS = ("mmsb", "always", "memory", "sqlite", "sqlite_normal")
_SQLITE_KINDS = ("sqlite", "sqlite_normal")


def _put_runs(ctx: RunContext) -> dict[str, list[list[float]]]:
    """Run the thread ``runs`` times on fresh savers of every kind, interleaved; keep
    the last run's savers for the read cases."""
    if "lg_puts" in ctx.cache:
        done: dict[str, list[list[float]]] = ctx.cache["lg_puts"]
        return done
    w = _workload(ctx)
    runs = ctx.pick(3, 1)
    samples: dict[str, list[list[float]]] = {k: [] for k in _KINDS}
    for r in range(runs):
        stores: dict[str, Any] = {}
        for kind in _KINDS:
            where = ctx.path(f"lg-{kind}-{r}")
            if kind in _SQLITE_KINDS:
                where.mkdir(parents=True, exist_ok=True)
                stores[kind] = _Sqlite(where / "lg.sqlite")
                if kind == "sqlite_normal":
                    stores[kind].saver.setup()
                    stores[kind].conn.execute("PRAGMA synchronous=NORMAL")
            else:
                stores[kind] = _open_mmsb(None if kind == "memory" else where,
                                          "always" if kind == "always" else "batch")
        savers = {k: (v.saver if k in _SQLITE_KINDS else v) for k, v in stores.items()}
        for kind, times in _drive_all(savers, w).items():
            samples[kind].append(times)
        ctx.cache["lg_setup"] = _check_setup(savers, stores["sqlite"].conn,
                                             stores["sqlite_normal"].conn)
        last = r == runs - 1
        for kind, store in stores.items():
            if last and kind in ("mmsb", "sqlite"):
                ctx.cache[f"lg_store:{kind}"] = store
                ctx.on_close(store.close)
            else:
                store.close()
    for kind in ("mmsb", "sqlite"):
        saver = ctx.cache[f"lg_store:{kind}"]
        saver = saver.saver if kind == "sqlite" else saver
        tup = saver.get_tuple(w.config())
        expect(tup is not None and tup.checkpoint["id"] == w.steps[-1].checkpoint["id"],
               f"{kind}: the latest checkpoint is not the last one put")
        expect(len(tup.checkpoint["channel_values"]["messages"]) == w.n,
               f"{kind}: the latest checkpoint lost messages")
    ctx.cache["lg_puts"] = samples
    return samples


def _check_setup(savers: dict[str, Any], conn: sqlite3.Connection,
                 normal: sqlite3.Connection) -> dict[str, Any]:
    """Check that the savers are compared on equal terms, and say how: one serializer
    (the same object: LangGraph's default), SQLite in its default durable mode (WAL,
    ``synchronous=FULL``: the WAL is synced at every commit) against MMSB's
    ``fsync="always"`` (the log is synced at every ``put``), and SQLite in WAL with
    ``synchronous=NORMAL`` (no sync at a commit: a power loss may take the last commits,
    a crash of the process none) against MMSB's default ``fsync="batch"`` (the same
    promise, with at most the last 5 ms lost)."""
    serdes = {id(s.serde) for s in savers.values()}
    expect(len(serdes) == 1, "the savers do not share one serializer")
    journal_mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    synchronous = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    expect(journal_mode == "wal" and synchronous == 2,
           f"SQLite runs with journal_mode={journal_mode}, synchronous={synchronous}, not "
           "SqliteSaver's defaults (wal, 2 = FULL)")
    normal_mode = str(normal.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    normal_sync = int(normal.execute("PRAGMA synchronous").fetchone()[0])
    expect(normal_mode == "wal" and normal_sync == 1,
           f"the unsynced SQLite runs with journal_mode={normal_mode}, "
           f"synchronous={normal_sync}, not wal, 1 = NORMAL")
    expect(savers["always"].state.config.fsync == "always",
           "the synced MMSB saver does not sync every put")
    return {
        "serializer": type(savers["sqlite"].serde).__name__,
        "sqlite_journal_mode": journal_mode,
        "sqlite_synchronous": synchronous,
        "mmsb_fsync_synced": savers["always"].state.config.fsync,
        "mmsb_fsync_default": savers["mmsb"].state.config.fsync,
        "sqlite_normal_synchronous": normal_sync,
    }


def _puts(ctx: RunContext, kind: str) -> CaseOutcome:
    runs = _put_runs(ctx)[kind]
    samples = [t for run in runs for t in run]
    return CaseOutcome(Measurement(stats=summarize(samples, 1), samples_ns=tuple(samples)), {
        "steps": len(runs[0]),
        "runs": len(runs),
        "p50_per_run_ns": [summarize(run, 1).median_ns for run in runs],
        "langgraph_checkpoint": _metadata.version("langgraph-checkpoint"),
        "langgraph_checkpoint_sqlite": _metadata.version("langgraph-checkpoint-sqlite"),
        **ctx.cache["lg_setup"],
    })


@case("langgraph", "put", "MMSBSaver.put, durable bus, fsync=\"batch\" (the default), one "
      "sample per step of a 500-step growing conversation")
def put(ctx: RunContext) -> CaseOutcome:
    return _puts(ctx, "mmsb")


@case("langgraph", "put_always", "MMSBSaver.put, durable bus, fsync=\"always\" (synced per put)")
def put_always(ctx: RunContext) -> CaseOutcome:
    return _puts(ctx, "always")


@case("langgraph", "put_memory", "MMSBSaver.put, in-memory bus")
def put_memory(ctx: RunContext) -> CaseOutcome:
    return _puts(ctx, "memory")


@case("langgraph", "put_sqlite", "SqliteSaver.put on a file (WAL, synchronous=FULL: its defaults)")
def put_sqlite(ctx: RunContext) -> CaseOutcome:
    return _puts(ctx, "sqlite")


@case("langgraph", "put_sqlite_normal", "SqliteSaver.put on a file in WAL with "
      "synchronous=NORMAL (no sync per commit: the durability of MMSB's fsync=\"batch\")")
def put_sqlite_normal(ctx: RunContext) -> CaseOutcome:
    return _puts(ctx, "sqlite_normal")


class _Precomputed:
    """A serializer that returns encodings made before timing for the objects it was
    primed with (matched by identity), and encodes anything else with ``inner``: to
    time what a saver's ``put`` does around LangGraph's encoding of the values."""

    def __init__(self, inner: Any, objects: list[Any]) -> None:
        self.inner = inner
        self.done = {id(o): (o, inner.dumps_typed(o)) for o in objects}

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        hit = self.done.get(id(obj))
        if hit is not None and hit[0] is obj:
            out: tuple[str, bytes] = hit[1]
            return out
        fresh: tuple[str, bytes] = self.inner.dumps_typed(obj)
        return fresh

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self.inner.loads_typed(data)


def _own_puts(ctx: RunContext) -> dict[str, list[float]]:
    """Each saver's own part of a put: the thread saved on fresh savers driven in turn,
    neither syncing (MMSB ``fsync="none"``, SQLite ``synchronous=OFF``), with a
    serializer primed with every step's channel values (what MMSB encodes) and whole
    checkpoint (what SQLite encodes); the small rest (MMSB: the checkpoint without its
    values and the metadata; SQLite: the metadata, as JSON) is still encoded."""
    if "lg_own_puts" in ctx.cache:
        done: dict[str, list[float]] = ctx.cache["lg_own_puts"]
        return done
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    import mmsb
    from mmsb.integrations.langgraph import MMSBSaver

    w = _workload(ctx)
    primed: list[Any] = []
    for step in w.steps:
        primed += [step.checkpoint, step.checkpoint["channel_values"]["messages"]]
    serde = _Precomputed(JsonPlusSerializer(), primed)
    samples: dict[str, list[float]] = {"mmsb": [], "sqlite": []}
    for r in range(ctx.pick(2, 1)):
        mine = MMSBSaver(ctx.path(f"lg-own-{r}"), serde=serde,
                         config=mmsb.MMSBConfig(fsync="none", max_tlog_size=1 << 20,
                                                checkpoint_interval=0))
        where = ctx.path(f"lg-own-sqlite-{r}")
        where.mkdir(parents=True, exist_ok=True)
        theirs = _Sqlite(where / "lg.sqlite", serde=serde)
        try:
            theirs.saver.setup()
            theirs.conn.execute("PRAGMA synchronous=OFF")
            for kind, times in _drive_all({"mmsb": mine, "sqlite": theirs.saver}, w).items():
                samples[kind] += times
        finally:
            mine.close()
            theirs.close()
    ctx.cache["lg_own_puts"] = samples
    return samples


@case("langgraph", "put_own", "MMSBSaver.put's own part: the values' encoding precomputed, "
      "no sync (fsync=\"none\"), one sample per step (paired with SqliteSaver)")
def put_own(ctx: RunContext) -> CaseOutcome:
    s = _own_puts(ctx)
    mine, theirs = summarize(s["mmsb"], 1), summarize(s["sqlite"], 1)
    return CaseOutcome(Measurement(stats=mine, samples_ns=tuple(s["mmsb"])), {
        "steps": _workload(ctx).n,
        "sqlite_median_ns": theirs.median_ns,
        "ratio_to_sqlite": mine.median_ns / theirs.median_ns,
    })


@case("langgraph", "put_own_sqlite", "SqliteSaver.put's own part: the checkpoint's encoding "
      "precomputed, synchronous=OFF")
def put_own_sqlite(ctx: RunContext) -> CaseOutcome:
    s = _own_puts(ctx)["sqlite"]
    return CaseOutcome(Measurement(stats=summarize(s, 1), samples_ns=tuple(s)),
                       {"paired_with": "langgraph/put_own"})


def _savers(ctx: RunContext) -> tuple[Any, Any]:
    """The durable MMSBSaver and the SqliteSaver holding the whole thread."""
    _put_runs(ctx)
    return ctx.cache["lg_store:mmsb"], ctx.cache["lg_store:sqlite"].saver


def _paired(ctx: RunContext, name: str, ops: list[Callable[[], object]],
            repeats: int | None = None) -> Measurement:
    """Time MMSB's and SQLite's operation in turn; keep SQLite's for its own case. Each
    operation's CPU time (this thread's, user and system: what the machine's other
    processes do not add to) is kept beside its wall time, for :func:`_cpu_metrics`."""
    import time

    cpu: list[list[float]] = [[] for _ in ops]

    def as_batch(op: Callable[[], object], out: list[float]) -> Callable[[Any, int], object]:
        clock = time.thread_time_ns

        def batch(_obj: Any, n: int) -> None:
            for _ in range(n):
                t0 = clock()
                op()
                out.append(float(clock() - t0))
        return batch

    mine, theirs = ctx.measure_paired([as_batch(op, out) for op, out in zip(ops, cpu,
                                                                             strict=True)],
                                      repeats=repeats)
    ctx.cache[f"lg_pair:{name}"] = theirs
    # The warm-up calls come first; the rest are the rounds, in the order timed.
    rounds = len(mine.samples_ns)
    ctx.cache[f"lg_cpu:{name}"] = (cpu[0][-rounds:], cpu[1][-rounds:])
    return mine


def _cpu_metrics(ctx: RunContext, name: str) -> dict[str, Any]:
    """MMSB's and SQLite's CPU time of a paired read (medians) and their ratios: of the
    medians, and the median of the per-round ratios. Both sides run the same decoding
    on one core and neither waits on the disk (both read from memory or the page
    cache), so the CPU time is the wall time less what other processes on the machine
    took from it; on a loaded machine it is the steadier comparison."""
    mine, theirs = ctx.cache[f"lg_cpu:{name}"]
    a, b = statistics.median(mine), statistics.median(theirs)
    return {
        "cpu_median_ns": a,
        "cpu_sqlite_median_ns": b,
        "cpu_ratio_to_sqlite": a / b if b > 0 else None,
        "cpu_ratio_per_round": statistics.median(x / y for x, y in zip(mine, theirs,
                                                                      strict=True) if y > 0),
    }


def _round_ratio(mine: Measurement, theirs: Measurement) -> float:
    """The median over the rounds of a paired measurement of MMSB's time over SQLite's
    in the same round: each pair was taken back to back, so drift in the machine
    between rounds cancels out of it."""
    pairs = zip(mine.samples_ns, theirs.samples_ns, strict=False)
    return statistics.median(a / b for a, b in pairs if b > 0)


def _sqlite_side(ctx: RunContext, name: str) -> CaseOutcome:
    m = ctx.cache.get(f"lg_pair:{name}")
    if m is None:
        raise CaseSkipped(f"langgraph/{name} did not run, and this case is its other half")
    return CaseOutcome(m, {"paired_with": f"langgraph/{name}"})


_READ_ROUNDS = 201
"""Rounds of a paired ``get_tuple`` (a few ms each): where the two sides differ by a
percent or two, the harness's default 31 leave the medians' ratio spread over a few
percent from run to run."""


def _get(ctx: RunContext, name: str, index: int | None) -> CaseOutcome:
    w = _workload(ctx)
    mine, theirs = _savers(ctx)
    config = w.config(index)
    a, b = mine.get_tuple(config), theirs.get_tuple(config)
    expect(a is not None and b is not None, f"{name}: a saver lost the checkpoint")
    expect(a.checkpoint["channel_values"] == b.checkpoint["channel_values"],
           f"{name}: the savers return different channel values")
    expect(a.pending_writes == b.pending_writes, f"{name}: different pending writes")
    m = _paired(ctx, name, [lambda: mine.get_tuple(config), lambda: theirs.get_tuple(config)],
                repeats=ctx.pick(_READ_ROUNDS, 3))
    sqlite_median = ctx.cache[f"lg_pair:{name}"].stats.median_ns
    return CaseOutcome(m, {
        "messages": len(a.checkpoint["channel_values"]["messages"]),
        "sqlite_median_ns": sqlite_median,
        "ratio_to_sqlite": m.stats.median_ns / sqlite_median,
        "ratio_per_round": _round_ratio(m, ctx.cache[f"lg_pair:{name}"]),
        **_cpu_metrics(ctx, name),
    })


@case("langgraph", "get_latest", "MMSBSaver.get_tuple of the thread's latest checkpoint "
      "(paired with SqliteSaver)")
def get_latest(ctx: RunContext) -> CaseOutcome:
    return _get(ctx, "get_latest", None)


@case("langgraph", "get_latest_sqlite", "SqliteSaver.get_tuple of the latest checkpoint")
def get_latest_sqlite(ctx: RunContext) -> CaseOutcome:
    return _sqlite_side(ctx, "get_latest")


@case("langgraph", "get_middle", "MMSBSaver.get_tuple of step N/2 (a past version: "
      "read_page_at) (paired with SqliteSaver)")
def get_middle(ctx: RunContext) -> CaseOutcome:
    return _get(ctx, "get_middle", _workload(ctx).n // 2)


@case("langgraph", "get_middle_sqlite", "SqliteSaver.get_tuple of step N/2")
def get_middle_sqlite(ctx: RunContext) -> CaseOutcome:
    return _sqlite_side(ctx, "get_middle")


class _NoDecode:
    """A serializer that decodes nothing (``loads_typed`` returns an empty dict), to
    time what a saver does around LangGraph's decoding."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        out: tuple[str, bytes] = self.inner.dumps_typed(obj)
        return out

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return {}


@case("langgraph", "get_middle_storage", "MMSBSaver.get_tuple of step N/2 with decoding "
      "left out: the saver's own part (paired with SqliteSaver)")
def get_middle_storage(ctx: RunContext) -> CaseOutcome:
    w = _workload(ctx)
    mine, theirs = _savers(ctx)
    config = w.config(w.n // 2)
    serdes = mine.serde, theirs.serde
    mine.serde, theirs.serde = _NoDecode(serdes[0]), _NoDecode(serdes[1])
    try:
        expect(mine.get_tuple(config) is not None and theirs.get_tuple(config) is not None,
               "get_middle_storage: a saver lost the checkpoint")
        m = _paired(ctx, "get_middle_storage", [lambda: mine.get_tuple(config),
                                                lambda: theirs.get_tuple(config)],
                    repeats=ctx.pick(_READ_ROUNDS, 3))
    finally:
        mine.serde, theirs.serde = serdes
    sqlite_median = ctx.cache["lg_pair:get_middle_storage"].stats.median_ns
    return CaseOutcome(m, {"sqlite_median_ns": sqlite_median,
                           "ratio_to_sqlite": m.stats.median_ns / sqlite_median,
                           "ratio_per_round": _round_ratio(
                               m, ctx.cache["lg_pair:get_middle_storage"]),
                           **_cpu_metrics(ctx, "get_middle_storage")})


@case("langgraph", "get_middle_storage_sqlite", "SqliteSaver.get_tuple of step N/2 with "
      "decoding left out")
def get_middle_storage_sqlite(ctx: RunContext) -> CaseOutcome:
    return _sqlite_side(ctx, "get_middle_storage")


@case("langgraph", "decode_middle", "LangGraph's serializer decoding step N/2's messages "
      "(the floor of both savers' reads)")
def decode_middle(ctx: RunContext) -> CaseOutcome:
    w = _workload(ctx)
    mine, _theirs = _savers(ctx)
    typed = mine.serde.dumps_typed(w.steps[w.n // 2].checkpoint["channel_values"]["messages"])

    def batch(_obj: Any, n: int) -> None:
        for _ in range(n):
            mine.serde.loads_typed(typed)

    m = ctx.measure(batch, max_inner=ctx.pick(1000, 5))
    return CaseOutcome(m, {"bytes": len(typed[1])})


@case("langgraph", "encode_middle", "LangGraph's serializer encoding step N/2's checkpoint "
      "(the floor of both savers' puts at that step)")
def encode_middle(ctx: RunContext) -> CaseOutcome:
    w = _workload(ctx)
    mine, _theirs = _savers(ctx)
    checkpoint = w.steps[w.n // 2].checkpoint

    def batch(_obj: Any, n: int) -> None:
        for _ in range(n):
            mine.serde.dumps_typed(checkpoint)

    m = ctx.measure(batch, max_inner=ctx.pick(1000, 5))
    return CaseOutcome(m, {"bytes": len(mine.serde.dumps_typed(checkpoint)[1])})


@case("langgraph", "list_history", "list of the thread's whole history with MMSBSaver "
      "(paired with SqliteSaver)")
def list_history(ctx: RunContext) -> CaseOutcome:
    w = _workload(ctx)
    mine, theirs = _savers(ctx)
    config = w.config()
    a = [t.checkpoint["id"] for t in mine.list(config)]
    b = [t.checkpoint["id"] for t in theirs.list(config)]
    expect(a == b and len(a) == w.n, "list_history: the savers list different checkpoints")
    m = _paired(ctx, "list_history", [lambda: list(mine.list(config)),
                                      lambda: list(theirs.list(config))],
                repeats=ctx.pick(9, 2))
    sqlite_median = ctx.cache["lg_pair:list_history"].stats.median_ns
    return CaseOutcome(m, {
        "checkpoints": w.n,
        "sqlite_median_ns": sqlite_median,
        "ratio_to_sqlite": m.stats.median_ns / sqlite_median,
        "ratio_per_round": _round_ratio(m, ctx.cache["lg_pair:list_history"]),
        **_cpu_metrics(ctx, "list_history"),
    })


@case("langgraph", "list_history_sqlite", "list of the thread's whole history with SqliteSaver")
def list_history_sqlite(ctx: RunContext) -> CaseOutcome:
    return _sqlite_side(ctx, "list_history")


@case("langgraph", "reopen", "open MMSBSaver on its bus and get the latest checkpoint "
      "(paired with SqliteSaver); metrics: bytes on disk of both")
def reopen(ctx: RunContext) -> CaseOutcome:
    w = _workload(ctx)
    _savers(ctx)
    mine = ctx.cache.pop("lg_store:mmsb")
    store = ctx.cache.pop("lg_store:sqlite")
    bus, db = Path(str(mine.path)), store.path
    mine.close()
    store.close()
    disk, sqlite_disk = _du(bus), _sqlite_bytes(db)

    def open_mmsb() -> None:
        saver = _open_mmsb(bus)
        try:
            expect(saver.get_tuple(w.config()) is not None, "reopen: the bus lost the thread")
        finally:
            saver.close()

    def open_sqlite() -> None:
        s = _Sqlite(db)
        try:
            expect(s.saver.get_tuple(w.config()) is not None, "reopen: SQLite lost the thread")
        finally:
            s.close()

    m = _paired(ctx, "reopen", [open_mmsb, open_sqlite], repeats=ctx.pick(11, 2))
    shutil.rmtree(bus, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.unlink(str(db) + suffix)
    return CaseOutcome(m, {
        "disk_bytes": disk,
        "sqlite_disk_bytes": sqlite_disk,
        "disk_ratio_to_sqlite": disk / sqlite_disk,
        "sqlite_median_ns": ctx.cache["lg_pair:reopen"].stats.median_ns,
    })


@case("langgraph", "reopen_sqlite", "open SqliteSaver on its file and get the latest checkpoint")
def reopen_sqlite(ctx: RunContext) -> CaseOutcome:
    return _sqlite_side(ctx, "reopen")
