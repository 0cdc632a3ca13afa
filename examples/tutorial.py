"""The MMSB tutorial: a commented walkthrough of the whole public API.

Run it with ``python examples/tutorial.py``. It prints as it goes and takes well under
a second. Each section stands on its own; read them in order the first time:

 1. pages                          6. log queries and replay
 2. deltas and the epoch rule      7. history and a blame-style view
 3. the graph and propagation      8. batches
 4. events                         9. a durable bus on disk
 5. checkpoints                   10. statistics
                                  11. instrumentation: code on pages
                                  12. gpu and unified pages (skipped without a device)

Only ``import mmsb`` is used: everything here is public API.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile

import mmsb


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


# -- 1. pages --------------------------------------------------------------------------

def pages(state: mmsb.MMSBState) -> None:
    section("1. pages")
    # A page is raw bytes: zero-filled, epoch 0, ids 1, 2, 3 … in creation order.
    notes = mmsb.create_page(state, 16, metadata={"name": "notes"})
    print("created", notes, "metadata", dict(notes.metadata))

    # Many pages at once: one lock, one log record (the fast path for bulk creation).
    cells = mmsb.create_pages(state, 4, 8)
    print("bulk-created ids", [p.id for p in cells], "- state.pages holds", len(state.pages))

    # update_page replaces the whole content; write_page writes a part at an offset.
    # Both log a delta of only the bytes that differ and raise the epoch by one.
    mmsb.update_page(state, notes.id, b"hello, mmsb!....")
    mmsb.write_page(state, notes.id, 12, b"\x00\x00\x00\x00")
    print("content", mmsb.query_page(state, notes.id), "epoch", notes.epoch)

    # Writing the bytes a page already holds logs nothing: the epoch stays put.
    mmsb.update_page(state, notes.id, mmsb.query_page(state, notes.id))
    print("after an identical update the epoch is still", notes.epoch)

    # page.data is a read-only view that follows later writes; page.mask says which
    # bytes any delta has ever written.
    view = notes.data
    assert not view.flags.writeable
    print("bytes ever written:", int(notes.mask.sum()), "of", notes.size)

    # Wrong lengths and ranges are refused with a typed error, and change nothing.
    try:
        mmsb.write_page(state, notes.id, 14, b"too long")
    except mmsb.InvalidDeltaError as exc:
        print("refused:", exc)

    # Metadata is logged too (so replay rebuilds it); values must be msgpack-encodable.
    mmsb.set_metadata(state, notes.id, "owner", "tutorial")
    print("metadata now", dict(notes.metadata))


# -- 2. deltas -------------------------------------------------------------------------

def deltas(state: mmsb.MMSBState) -> int:
    section("2. deltas and the epoch conflict check")
    page = mmsb.create_page(state, 8, metadata={"name": "shared"})

    # create_delta builds (does not apply) a delta from a mask (one bool per byte) and
    # full-length data; route_delta validates, logs, applies and propagates it.
    mask = [True, True, False, False, False, False, False, False]
    d = mmsb.create_delta(state, page.id, mask, b"AB\x00\x00\x00\x00\x00\x00")
    print("built", d, "- base epoch", d.base_epoch, "→ epoch", d.epoch)
    mmsb.route_delta(state, d)
    print("routed: page is", mmsb.query_page(state, page.id), "at epoch", page.epoch)

    # Two writers build deltas on the same epoch. The first one wins; the second is
    # refused, because its base_epoch is no longer the page's epoch: a lost update
    # detected instead of silently overwritten.
    w1 = mmsb.create_delta(state, page.id, [False] * 2 + [True] + [False] * 5, b"\x00\x00C" + bytes(5))
    w2 = mmsb.create_delta(state, page.id, [False] * 3 + [True] + [False] * 4, b"\x00\x00\x00D" + bytes(4))
    mmsb.route_delta(state, w1)
    try:
        mmsb.route_delta(state, w2)
    except mmsb.InvalidDeltaError as exc:
        print("conflict:", exc)
        # The remedy: rebuild from the current page and try again.
        w2 = mmsb.create_delta(state, page.id, [False] * 3 + [True] + [False] * 4, b"\x00\x00\x00D" + bytes(4))
        mmsb.route_delta(state, w2)
    print("page is", mmsb.query_page(state, page.id), "at epoch", page.epoch)

    # Deltas are sparse (only the changed bytes) when at most a quarter of the page
    # changes, dense otherwise. They merge (later wins) and serialize to checked bytes.
    log = mmsb.get_deltas_for_page(state, page.id)
    merged = mmsb.merge_deltas(log[0], log[1])
    print("merged", merged, "writes", mmsb.delta_byte_count(merged), "bytes")
    raw = mmsb.serialize_delta(merged)
    assert mmsb.deserialize_delta(raw) == merged
    try:
        mmsb.deserialize_delta(raw[:-1])
    except mmsb.SerializationError as exc:
        print("damaged bytes refused:", exc)
    return page.id


# -- 3. graph and propagation ----------------------------------------------------------

def graph(state: mmsb.MMSBState) -> dict[str, int]:
    section("3. the dependency graph and propagation")
    # A diamond:  a → b, a → c, b → d, c → d (DATA edges: children are recomputed).
    # And a CONTROL edge a → cfg: cfg is marked stale instead of recomputed.
    a, b, c, d = (mmsb.create_page(state, 4) for _ in range(4))
    cfg = mmsb.create_page(state, 4, metadata={"name": "config"})
    for parent, child in ((a, b), (a, c), (b, d), (c, d)):
        mmsb.add_dependency(state, parent.id, child.id, mmsb.DATA_DEPENDENCY)
    mmsb.add_dependency(state, a.id, cfg.id, mmsb.CONTROL_DEPENDENCY)

    def u32(page_id: int) -> int:
        return int(struct.unpack("<I", mmsb.query_page(state, page_id))[0])

    calls = {"d": 0}

    # A recompute function returns the child's whole new content. Its result is
    # logged as a delta with source "propagation", so replay never calls it.
    mmsb.register_recompute_fn(state, b.id, lambda st, page: struct.pack("<I", u32(a.id) + 1))
    mmsb.register_passthrough_recompute(                       # c = transform(a's bytes)
        state, c.id, a.id, lambda raw: struct.pack("<I", 2 * struct.unpack("<I", raw)[0]))

    def recompute_d(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        calls["d"] += 1
        return struct.pack("<I", u32(b.id) + u32(c.id))

    mmsb.register_recompute_fn(state, d.id, recompute_d)

    mmsb.update_page(state, a.id, struct.pack("<I", 10))
    # d ran once, after both b and c were up to date (glitch-free): 11 + 20 = 31.
    print(f"a=10 → b={u32(b.id)} c={u32(c.id)} d={u32(d.id)}; d recomputed {calls['d']} time(s)")
    assert u32(d.id) == 31 and calls["d"] == 1
    print("config metadata after the change:", dict(cfg.metadata))

    print("children of a:", [(pid, et.name) for pid, et in mmsb.get_children(state, a.id)])
    print("topological order:", mmsb.topological_sort(state))
    print("descendants of a:", sorted(mmsb.find_descendants(state, a.id)))
    try:
        mmsb.add_dependency(state, d.id, a.id)           # would close a cycle
    except mmsb.GraphCycleError as exc:
        print("refused:", exc)

    # Deferred propagation: changes queue until execute_propagation().
    mmsb.schedule_propagation(state, [a.id])
    print("execute_propagation covered", mmsb.execute_propagation(state), "queued page(s)")
    return {"a": a.id, "b": b.id, "c": c.id, "d": d.id, "cfg": cfg.id}


# -- 4. events -------------------------------------------------------------------------

def events(state: mmsb.MMSBState, ids: dict[str, int]) -> None:
    section("4. events")
    seen: list[str] = []

    # handler(state, event_type, *data); data[0] is the page id of every page event.
    def on_change(_st: mmsb.MMSBState, _et: mmsb.EventType, page_id: int, epoch: int, _delta_id: int) -> None:
        seen.append(f"page {page_id} epoch {epoch}")

    # filter: a page id, several ids, or a predicate f(event_type, *data) -> bool.
    only_d = mmsb.subscribe(state, mmsb.EventType.PAGE_CHANGED, on_change, filter=ids["d"])
    stale = mmsb.subscribe(state, mmsb.EventType.PAGE_STALE,
                           lambda _s, _et, pid, parent: seen.append(f"page {pid} stale (parent {parent})"),
                           filter=lambda _et, pid, *_rest: pid == ids["cfg"])

    # Events are delivered after the write is complete and the lock released.
    mmsb.update_page(state, ids["a"], struct.pack("<I", 20))
    print("delivered:", seen)

    # A handler that raises is logged and counted; the write it came from stands.
    def broken(*_args: object) -> None:
        raise RuntimeError("a buggy subscriber")

    oops = mmsb.subscribe(state, mmsb.EventType.DELTA_APPLIED, broken, filter=ids["a"])
    logging.getLogger("mmsb._core.events").disabled = True       # keep the tutorial's output tidy
    mmsb.update_page(state, ids["a"], struct.pack("<I", 21))
    logging.getLogger("mmsb._core.events").disabled = False
    print("handler errors so far:", mmsb.get_stats(state).handler_errors)

    for sub in (only_d, stale, oops):
        assert mmsb.unsubscribe(state, sub)
    seen.clear()
    mmsb.update_page(state, ids["a"], struct.pack("<I", 22))
    print("after unsubscribe:", seen)


# -- 5. checkpoints --------------------------------------------------------------------

def checkpoints(state: mmsb.MMSBState, tmp: str) -> None:
    section("5. checkpoint and load")
    path = os.path.join(tmp, "tutorial.mmsbckpt")
    size = mmsb.checkpoint_log(state, path)        # pages, epochs, metadata, graph, log
    restored = mmsb.MMSBState()
    mmsb.load_checkpoint(restored, path)
    same = all(mmsb.query_page(restored, pid) == mmsb.query_page(state, pid) for pid in state.pages)
    print(f"wrote {size:,} bytes; restored {len(restored.pages)} pages, identical: {same}, "
          f"log of {len(restored.tlog)} deltas")
    # Recompute functions are code: they are not saved. Register them again after a load.

    # A damaged file is refused and the target state is left as it was.
    with open(path, "rb") as f:
        good = f.read()
    bad = os.path.join(tmp, "damaged.mmsbckpt")
    with open(bad, "wb") as f:
        f.write(good[: len(good) // 2])
    try:
        mmsb.load_checkpoint(restored, bad)
    except mmsb.SerializationError as exc:
        print("refused:", exc)
    print("restored state untouched:", len(restored.pages), "pages")

    # Or a new state straight from a file.
    again = mmsb.replay_from_checkpoint(path)
    print("replay_from_checkpoint:", again)


# -- 6. replay -------------------------------------------------------------------------

def replay(state: mmsb.MMSBState, shared_id: int) -> None:
    section("6. log queries and replay")
    stats = mmsb.compute_log_statistics(state)
    print(f"log: {stats['total_deltas']} deltas, {stats['bytes_changed']} bytes changed, "
          f"sources {stats['sources']}")
    print("propagation deltas:", len(mmsb.query_log(state, source="propagation")))
    print("first three deltas:", mmsb.get_deltas_in_range(state, 0, 3))

    # replay_to_lsn: a detached state exactly as it was right after one record.
    first = mmsb.get_deltas_for_page(state, shared_id)[0]
    past = mmsb.replay_to_lsn(state, first.lsn)
    print(f"page {shared_id} right after LSN {first.lsn}:", mmsb.query_page(past, shared_id))

    # replay_to_epoch: a per-page cut (each page with its deltas of epoch ≤ N).
    cut = mmsb.replay_to_epoch(state, 1)
    print(f"page {shared_id} at epoch ≤ 1:", mmsb.query_page(cut, shared_id))

    # replay_to_timestamp: the state at a moment (nanoseconds), via the log's times.
    at = mmsb.replay_to_timestamp(state, first.timestamp)
    print("records up to that moment:", at.last_lsn)

    # replay_page_history: one snapshot per delta of the page, oldest first.
    for snap in mmsb.replay_page_history(state, shared_id):
        print(f"  epoch {snap.epoch} (LSN {snap.lsn}, {snap.source}): {snap.data!r}")

    # The core guarantee, checked: the live state equals the replay of its log.
    print("verify_state_consistency:", mmsb.verify_state_consistency(state))

    # compute_diff / incremental_replay: the deltas that turn one state into another.
    diff = mmsb.compute_diff(past, state)
    mmsb.incremental_replay(past, diff)
    print("after incremental_replay the past state has caught up:",
          all(mmsb.query_page(past, p) == mmsb.query_page(state, p) for p in past.pages))


# -- 7. history and blame --------------------------------------------------------------

def blame(state: mmsb.MMSBState, page_id: int) -> None:
    section("7. history and a blame-style view")
    size = state.pages[page_id].size
    last_writer: list[mmsb.Delta | None] = [None] * size
    print(f"history of page {page_id}:")
    for d in mmsb.get_deltas_for_page(state, page_id):
        print(f"  LSN {d.lsn} epoch {d.base_epoch}→{d.epoch} source {d.source!r} "
              f"bytes {d.indices.tolist()} = {d.values.tobytes()!r}")
        for i in d.indices.tolist():
            last_writer[i] = d
    # For every maximal byte range, the delta that last wrote it (`mmsb blame` does
    # this for a bus on disk).
    print("blame:")
    start = 0
    for i in range(1, size + 1):
        if i == size or last_writer[i] is not last_writer[start]:
            w = last_writer[start]
            who = "never written" if w is None else f"LSN {w.lsn}, epoch {w.epoch}, {w.source}"
            print(f"  bytes {start}:{i} ← {who}")
            start = i


# -- 8. batches ------------------------------------------------------------------------

def batches(state: mmsb.MMSBState) -> None:
    section("8. batches")
    grid = mmsb.create_pages(state, 64, 64)
    before = len(state.tlog)

    # apply_batch: many (page_id, offset, bytes) writes, all checked before any is
    # applied, logged in one append, then one propagation pass and one event burst.
    writes = [(p.id, k % 60, bytes([k + 1]) * 4) for k, p in enumerate(grid)]
    logged = mmsb.apply_batch(state, writes)
    print(f"apply_batch: {len(writes)} writes → {logged} deltas (log grew by {len(state.tlog) - before})")

    # The context-manager form: writes apply at once (visible to reads), their records
    # are appended together when the block ends.
    with mmsb.batch(state) as b:
        b.write(grid[0].id, 0, b"BATCH")
        mmsb.write_page(state, grid[1].id, 0, b"ALSO")
        print("inside the block, reads see the write:", mmsb.query_page(state, grid[0].id)[:5])

    # If the block raises, every write it made is undone: state and log as before.
    epoch, lsn = grid[2].epoch, state.last_lsn
    try:
        with mmsb.batch(state) as b:
            b.write(grid[2].id, 0, b"GONE")
            b.write(grid[2].id, 62, b"runs past the end")     # refused → the block fails
    except mmsb.InvalidDeltaError as exc:
        print("batch failed:", exc)
    assert grid[2].epoch == epoch and state.last_lsn == lsn
    print("rolled back: epoch", grid[2].epoch, "- last LSN unchanged:", state.last_lsn == lsn)
    print("still consistent:", mmsb.verify_state_consistency(state))


# -- 9. durable bus -------------------------------------------------------------------

def durable(tmp: str) -> None:
    section("9. a durable bus on disk")
    path = os.path.join(tmp, "bus")
    # path=DIR: every record goes to a write-ahead log in DIR before the call returns.
    bus = mmsb.mmsb_start(enable_gpu=False, path=path,
                          config=mmsb.MMSBConfig(fsync="always"))
    page = mmsb.create_page(bus, 12, metadata={"name": "persisted"})
    mmsb.update_page(bus, page.id, b"survives! :)")

    # One writer at a time: a second open of the same directory is refused.
    try:
        mmsb.mmsb_start(path=path)
    except mmsb.BusLockedError as exc:
        print("refused:", exc)

    # A reader beside the writer: recovered into memory, nothing on disk touched.
    ro = mmsb.open_readonly(path)
    print("read-only view sees:", mmsb.query_page(ro, page.id))
    mmsb.mmsb_stop(bus)                    # final checkpoint, flush, release the lock

    with mmsb.mmsb_start(enable_gpu=False, path=path) as reopened:    # recovered
        again = reopened.pages[page.id]
        print("after reopen:", mmsb.query_page(reopened, page.id), "epoch", again.epoch,
              "metadata", dict(again.metadata))
        print("files:", sorted(os.listdir(path)))
        print("recovery notes:", reopened.recovery_notes or "none")


# -- 10. statistics --------------------------------------------------------------------

def statistics(state: mmsb.MMSBState) -> None:
    section("10. statistics")
    s = mmsb.get_stats(state)
    print(f"{s.total_pages} pages, {s.total_deltas} deltas, {s.graph_edges} edges; "
          f"{s.delta_apply_count} deltas applied, {s.delta_apply_avg_ns / 1000:.1f} µs each on average; "
          f"{s.propagation_count} propagation passes")
    buf = io.StringIO()
    mmsb.print_stats(state, file=buf)                          # a table (rich)
    print("\n".join(buf.getvalue().splitlines()[:8]), "\n  …")
    mmsb.reset_stats(state)                                    # counters only, not the state
    print("after reset_stats:", mmsb.get_stats(state).delta_apply_count, "writes counted,",
          mmsb.get_stats(state).total_pages, "pages still there")


# -- 11. instrumentation: code on pages -------------------------------------------------

PIPELINE = """\
def celsius(state, page):
    raw = bytes(state.pages[page.id - 1].data)
    return bytes(((f - 32) * 5 // 9) % 256 for f in raw)


def alarm(state, page):
    temps = bytes(state.pages[page.id - 1].data)
    return bytes(1 if t > 30 else 0 for t in temps)
"""


def instrumentation(tmp: str) -> None:
    section("11. instrumentation: code on pages")
    import importlib
    import sys

    # A small pipeline in its own module, as an application would have it.
    path = os.path.join(tmp, "weather_pipeline.py")
    with open(path, "w") as f:
        f.write(PIPELINE)
    sys.path.insert(0, tmp)
    sys.dont_write_bytecode = True
    with mmsb.mmsb_start(enable_gpu=False) as state:
        # Capture modules named weather_* as they are imported: their source, syntax
        # tree and bytecode IR go on pages, linked source -> ast -> ir by COMPILER edges.
        mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=("weather_*",)))
        import weather_pipeline as wp

        code = mmsb.code_pages(state, wp.celsius)
        print("celsius's code pages:", code)
        ir = mmsb.deserialize_code_ir(mmsb.query_page(state, code["ir"]))   # data, never run
        print(f"its IR: {len(ir.instructions)} instructions, names {ir.names}, "
              f"flags {ir.flag_names}")

        fahrenheit, celsius, alarm = (mmsb.create_page(state, 3) for _ in range(3))
        mmsb.add_dependency(state, fahrenheit.id, celsius.id)
        mmsb.add_dependency(state, celsius.id, alarm.id)
        mmsb.register_recompute_fn(state, celsius.id, wp.celsius)   # adds ir -> page too
        mmsb.register_recompute_fn(state, alarm.id, wp.alarm)
        mmsb.update_page(state, fahrenheit.id, bytes([50, 86, 104]))
        print("celsius:", list(mmsb.query_page(state, celsius.id)),
              "alarm:", list(mmsb.query_page(state, alarm.id)))

        # Change one function (a bug fix: round to nearest) and reload the module.
        invalidated: list[int] = []
        mmsb.subscribe(state, mmsb.EventType.IR_INVALIDATED,
                       lambda s, e, page_id, parent: invalidated.append(page_id))
        age = mmsb.world_age()
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("(f - 32) * 5 // 9", "round((f - 32) * 5 / 9)"))
        os.utime(path, (os.path.getmtime(path) + 2,) * 2)
        wp = importlib.reload(wp)
        code_pages = {p for p in set(invalidated) if "code_artefact" in state.pages[p].metadata}
        print(f"world age {age} -> {mmsb.world_age()}; IR_INVALIDATED for code pages "
              f"{sorted(code_pages)} (recaptured at once) and for data pages "
              f"{sorted(set(invalidated) - code_pages)}")
        print("celsius page ir_valid:", state.pages[celsius.id].metadata.get("ir_valid"),
              "| alarm page:", state.pages[alarm.id].metadata.get("ir_valid", "untouched"))

        # Recompute with the new code; each propagated delta says which code made it.
        mmsb.register_recompute_fn(state, celsius.id, wp.celsius)
        mmsb.update_page(state, fahrenheit.id, bytes([51, 87, 105]))
        for d in mmsb.get_deltas_for_page(state, celsius.id):
            made = mmsb.produced_by(state, d)
            assert made is not None
            print(f"  celsius delta at LSN {d.lsn}: {made['name']} #{made['hash'][:8]} "
                  f"(IR page {made['ir_page']} at epoch {made['ir_epoch']})")
        for diff in mmsb.code_differences(state):
            print("  from old code:", diff.reason)
        print("verify, code included:", mmsb.verify_state_consistency(state, check_code=True))
    sys.path.remove(tmp)
    sys.modules.pop("weather_pipeline", None)


# -- 12. gpu and unified pages -----------------------------------------------------------

def devices() -> None:
    section("12. gpu and unified pages")
    if not mmsb.is_unified_memory_available():
        # No CuPy, no driver, no device, or no managed memory with concurrent access
        # (docs/Devices.md; the create calls below would say which in their error).
        print("skipped: no CUDA device with managed memory is usable here")
        return
    import cupy as cp

    with mmsb.mmsb_start() as state:                            # enable_gpu detected
        # A unified page's bytes are managed memory: the CPU writes, the GPU reads the
        # same bytes, no copy.
        u = mmsb.create_page(state, 1 << 20, location="unified")
        mmsb.write_page(state, u.id, 0, b"written on the CPU")
        on_gpu = cp.from_dlpack(u.device_array())               # a view, not a copy
        print("GPU reads:", bytes(cp.asnumpy(on_gpu[:18])))
        mmsb.set_preferred_location(state, u.id, "gpu")         # hints for the driver
        mmsb.prefetch_to_gpu(state, u.id).wait()
        # A gpu page keeps a host mirror and a device copy; small writes leave the copy
        # behind until a sync, and many pages sync in one batch.
        gpus = mmsb.create_pages(state, 100, 4096, location="gpu")
        for k, p in enumerate(gpus):
            mmsb.write_page(state, p.id, 0, k.to_bytes(4, "little"))
        handle = mmsb.sync_pages_to_gpu_async(state, [p.id for p in gpus])
        print("synced", len(handle.wait()), "gpu pages in one batch")
        # Device arrays are written as they are: diffed on the GPU, only changes logged.
        mmsb.write_page(state, gpus[0].id, 8, cp.arange(16, dtype=cp.uint8))
        s = mmsb.get_stats(state)
        print(f"{s.unified_pages} unified page(s), {s.gpu_pages} gpu pages; "
              f"{s.device_pages_synced} device copies synced, {s.unified_prefetches} prefetch")


def main() -> None:
    # enable_gpu=False: CPU pages only, the same on every machine.
    with mmsb.mmsb_start(enable_gpu=False) as state, tempfile.TemporaryDirectory() as tmp:
        assert mmsb.active_state() is state                  # mmsb_start makes it active
        pages(state)
        shared = deltas(state)
        ids = graph(state)
        events(state, ids)
        checkpoints(state, tmp)
        replay(state, shared)
        blame(state, shared)
        batches(state)
        durable(tmp)
        statistics(state)
        instrumentation(tmp)
    devices()
    print("\ndone: the states were stopped when their with-blocks ended.")


if __name__ == "__main__":
    main()
