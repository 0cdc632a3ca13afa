"""The ``mmsb ui`` inspector: its JSON endpoints driven directly, the command as a user
runs it (a subprocess beside a live writer), and every view in a headless Chromium."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

import mmsb
from mmsb.cli.demo import run_demo

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from mmsb.ui._app import create_app  # noqa: E402
from mmsb.ui._data import MAX_BINS, MAX_BYTES, Inspected  # noqa: E402

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OPENBLAS_NUM_THREADS": "1"}
CHROMIUM = Path("/usr/bin/chromium")


def _files_digest(path: Path) -> dict[str, str]:
    """Name → SHA-256 of every file of a bus directory (to show nothing was written)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def demo_bus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ui") / "bus"
    run_demo(path, Console(file=io.StringIO()))
    return path


@pytest.fixture
def client(demo_bus: Path) -> Iterator[TestClient]:
    inspected = Inspected(demo_bus)
    try:
        yield TestClient(create_app(inspected, lambda: {"testserver"}))
    finally:
        inspected.close()


def get(client: TestClient, url: str, status: int = 200) -> Any:
    r = client.get(url)
    assert r.status_code == status, r.text
    return r.json()


# -- endpoints ----------------------------------------------------------------------------

def test_summary_and_timeline_count_every_record(client: TestClient, demo_bus: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    s = get(client, "/api/summary")
    assert (s["kind"], s["last_lsn"], s["pages"]) == ("bus", state.last_lsn, len(state.pages))
    t = get(client, "/api/timeline?bins=4")
    assert len(t["edges"]) == 5 and t["edges"][0] == 1 and t["edges"][-1] == state.last_lsn + 1
    total = sum(sum(v) for v in t["series"].values())
    assert total == len(state.log.records)
    deltas = mmsb.query_log(state)
    for source in {d.source for d in deltas}:
        assert sum(t["series"][source]) == sum(d.source == source for d in deltas)
    only = get(client, "/api/timeline?bins=4&page=1")
    assert sum(map(sum, only["series"].values())) == len(mmsb.get_deltas_for_page(state, 1))
    prop = get(client, "/api/timeline?source=propagation")
    assert set(prop["series"]) == {"propagation"}
    zoom = get(client, f"/api/timeline?lo=6&hi={state.last_lsn}&bins=1000")
    assert len(zoom["edges"]) - 1 == state.last_lsn - 6 + 1  # one bin per LSN at most


def test_timeline_over_time(client: TestClient, demo_bus: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    recs = list(state.log.records)
    us = [r.timestamp // 1000 for r in recs]
    t = get(client, "/api/timeline?axis=time&bins=7")
    assert t["axis"] == "time" and (t["lo"], t["hi"]) == (us[0], us[-1])
    edges = t["edges"]
    assert len(edges) - 1 == min(7, us[-1] - us[0] + 1)
    assert edges[0] == us[0] and edges[-1] == us[-1] + 1
    assert sum(map(sum, t["series"].values())) == len(recs)
    for i in range(len(edges) - 1):
        inside = [r for r, u in zip(recs, us, strict=True) if edges[i] <= u < edges[i + 1]]
        assert sum(v[i] for v in t["series"].values()) == len(inside)
        assert t["ranges"][i] == ([inside[0].lsn, inside[-1].lsn] if inside else None)
        assert (t["times"][i] is None) == (not inside)
    # Zoomed to a window of time: exactly the records stamped inside it.
    lo, hi = us[len(us) // 3], us[2 * len(us) // 3]
    z = get(client, f"/api/timeline?axis=time&lo={lo}&hi={hi}&bins=2000")
    assert sum(map(sum, z["series"].values())) == sum(lo <= u <= hi for u in us)
    assert len(z["edges"]) - 1 <= 2000
    prop = get(client, "/api/timeline?axis=time&source=propagation")
    assert set(prop["series"]) == {"propagation"}
    assert sum(prop["series"]["propagation"]) == sum(d.source == "propagation"
                                                      for d in mmsb.query_log(state))
    lsn_axis = get(client, "/api/timeline?bins=5")
    assert lsn_axis["axis"] == "lsn" and len(lsn_axis["ranges"]) == 5


def test_log_rows_filter_and_bound(client: TestClient, demo_bus: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    rows = get(client, "/api/log")["rows"]
    assert [r["lsn"] for r in rows] == [d.lsn for d in mmsb.query_log(state)]
    page2 = get(client, "/api/log?page=2&limit=2")
    assert page2["total"] == len(mmsb.get_deltas_for_page(state, 2)) and len(page2["rows"]) == 2
    assert page2["truncated"] and all(r["page"] == 2 for r in page2["rows"])
    lsn = rows[1]["lsn"]
    assert [r["lsn"] for r in get(client, f"/api/log?lo={lsn}&hi={lsn}")["rows"]] == [lsn]
    get(client, "/api/log?limit=100000", 400)


def test_pages_heat_history_version_blame(client: TestClient, demo_bus: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    pages = get(client, "/api/pages")
    assert [r["id"] for r in pages["rows"]] == list(state.pages)
    deltas = mmsb.get_deltas_for_page(state, 1)
    count = np.zeros(state.pages[1].size, np.int64)
    last = np.zeros(state.pages[1].size, np.int64)
    for d in deltas:
        count[d.indices] += 1
        last[d.indices] = d.lsn
    assert get(client, "/api/pages/1/heat")["cells"] == count.tolist()
    assert get(client, "/api/pages/1/heat?mode=recency")["cells"] == last.tolist()
    hist = get(client, "/api/pages/1/history")
    assert [r["lsn"] for r in hist["rows"]] == [d.lsn for d in deltas]
    now = get(client, "/api/pages/1/version")
    assert bytes.fromhex(now["hex"]) == mmsb.query_page(state, 1)
    assert now["versions"] == [d.lsn for d in deltas]
    for k, d in enumerate(deltas):
        v = get(client, f"/api/pages/1/version?lsn={d.lsn}")
        assert bytes.fromhex(v["hex"]) == mmsb.read_page_at(state, 1, lsn=d.lsn)
        assert v["version_lsn"] == d.lsn
        before = mmsb.read_page_at(state, 1, lsn=deltas[k - 1].lsn) if k else bytes(d.page_size)
        after = mmsb.read_page_at(state, 1, lsn=d.lsn)
        assert v["changed"] == [i for i in range(len(after)) if after[i] != before[i]]
    window = get(client, "/api/pages/2/version?offset=4&length=8")
    assert bytes.fromhex(window["hex"]) == mmsb.query_page(state, 2)[4:12]
    b = get(client, "/api/pages/2/blame")
    assert b["ranges"][0]["start"] == 0 and b["ranges"][-1]["stop"] == state.pages[2].size
    assert any(r.get("source") == "propagation" for r in b["ranges"])


def _reference_heat(state: mmsb.MMSBState, ids: list[int], cols: int
                    ) -> dict[int, tuple[list[int], list[int]]]:
    """Page id → (deltas per cell, newest LSN per cell), one Delta object at a time."""
    out = {}
    for pid in ids:
        size = state.pages[pid].size
        nc = min(cols, size)
        counts = np.zeros(nc, np.int64)
        last = np.zeros(nc, np.int64)
        for d in mmsb.get_deltas_for_page(state, pid):
            idx = d.indices
            cells = np.unique(idx[idx < size] * nc // size)
            counts[cells] += 1
            last[cells] = np.maximum(last[cells], d.lsn)
        out[pid] = (counts.tolist(), last.tolist())
    return out


def test_heat_across_pages(client: TestClient, demo_bus: Path, tmp_path: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    h = get(client, "/api/heat?cols=64")
    assert [r["page"] for r in h["rows"]] == list(state.pages) and h["total"] == len(state.pages)
    # With a cell per byte, a cell's count is how many deltas wrote that byte.
    per_byte = np.zeros(state.pages[1].size, np.int64)
    for d in mmsb.get_deltas_for_page(state, 1):
        per_byte[d.indices] += 1
    assert h["rows"][0]["cells"] == per_byte.tolist()
    # Every kind of delta (runs, positions, full and masked dense, merged), resized,
    # cloned and deleted pages, cells that split bytes unevenly.
    varied = _varied_history(rounds=20)
    ck = tmp_path / "varied.ckpt"
    mmsb.checkpoint_log(varied, ck)
    inspected = Inspected(ck)
    try:
        c = TestClient(create_app(inspected, lambda: {"testserver"}))
        live = list(varied.pages)
        assert len(live) > 256 and any(varied.pages[p].size == 80 for p in live)
        for off in (0, 256):
            ref = _reference_heat(varied, live[off:off + 256], 7)
            for mode, which in (("count", 0), ("recency", 1)):
                got = get(c, f"/api/heat?mode={mode}&offset={off}&limit=256&cols=7")
                assert got["total"] == len(live)
                assert [r["page"] for r in got["rows"]] == live[off:off + 256]
                for r in got["rows"]:
                    assert r["cells"] == ref[r["page"]][which], (mode, r["page"])
                assert got["max"] == max(max(v[which]) for v in ref.values())
        # One page's map, a cell per byte: the same counts and newest LSNs.
        for pid in [live[0], live[9], live[20], live[-1]]:
            size = varied.pages[pid].size
            count, last = _reference_heat(varied, [pid], size)[pid]
            assert get(c, f"/api/pages/{pid}/heat")["cells"] == count
            assert get(c, f"/api/pages/{pid}/heat?mode=recency")["cells"] == last
    finally:
        inspected.close()


def test_graph_now_and_at_an_lsn(client: TestClient, demo_bus: Path) -> None:
    state = mmsb.open_readonly(demo_bus)
    g = get(client, "/api/graph")
    assert {(e["parent"], e["child"], e["type"]) for e in g["edges"]} == {
        (p, c, mmsb.EdgeType(t).name) for p, c, t in state.graph.edges()}
    stale_now = {n["id"] for n in g["nodes"] if n["stale"]}
    assert stale_now == {pid for pid, p in state.pages.items() if p.metadata.get("stale")}
    assert stale_now  # the demo's CONTROL child is marked stale by a write
    first = min(d.lsn for d in mmsb.query_log(state))
    early = get(client, f"/api/graph?lsn={first - 1}")
    assert early["lsn"] == first - 1 and not any(n["stale"] for n in early["nodes"])


def test_stats_latency_series(client: TestClient, demo_bus: Path) -> None:
    from mmsb._storage.stats_file import read_stats

    s = get(client, "/api/stats")
    # The demo's writer published its counters when it stopped (its final checkpoint).
    pub = read_stats(demo_bus)
    assert pub is not None and s["writer"]["pid"] == pub["pid"] and s["writer_note"] is None
    for kind, k in s["writer"]["kinds"].items():
        assert k["count"] == pub["kinds"][kind]["count"]
        assert sum(k["hist"]["counts"]) == pub["kinds"][kind]["samples"]
        assert len(k["hist"]["labels"]) == len(k["hist"]["counts"])
    assert s["writer"]["kinds"]["delta_apply"]["count"] > 0
    assert s["writer"]["kinds"]["checkpoint"]["count"] > 0
    assert s["stats"]["total_pages"] == 3
    assert set(s["latency"]) == {"delta_apply", "propagation", "log_append", "checkpoint"}
    assert set(s["latency"]["delta_apply"]) == {"count", "p50", "p90", "p99", "max"}
    sizes = s["delta_payload_bytes"]
    assert len(sizes["labels"]) == len(sizes["counts"])
    assert sum(sizes["counts"]) == s["stats"]["total_deltas"]


def test_stats_file_round_trip_and_refusals(tmp_path: Path) -> None:
    from mmsb._core.monitor import Counters
    from mmsb._storage.stats_file import SIZE, decode_stats, encode_stats, read_stats

    c = Counters()
    rng = np.random.default_rng(5)
    for v in rng.integers(0, 10**8, 5000).tolist():
        c.delta_apply.add(v)
    for v in (0, 1, 2, 3, (1 << 63) - 1):
        c.log_append.add(v)
    data = encode_stats(c, 42, written_ns=7, pid=9)
    got = decode_stats(data)
    assert (got["last_lsn"], got["written_ns"], got["pid"]) == (42, 7, 9)
    kept = np.frombuffer(c.delta_apply.samples, np.int64)
    k = got["kinds"]["delta_apply"]
    assert (k["count"], k["samples"], k["max_ns"]) == (5000, len(kept), c.delta_apply.max_ns)
    assert [k["p50_ns"], k["p90_ns"], k["p99_ns"]] == pytest.approx(
        np.percentile(kept, [50, 90, 99]).tolist())
    assert k["bins"] == np.bincount([int(x).bit_length() for x in kept], minlength=64).tolist()
    assert got["kinds"]["log_append"]["bins"][:4] == [1, 1, 2, 0]
    assert got["kinds"]["log_append"]["bins"][63] == 1  # 2**62 ns and longer
    assert got["kinds"]["propagation"]["samples"] == 0
    assert decode_stats(encode_stats(c, 1, written_ns=-5))["written_ns"] == 0  # clock < 1970
    assert read_stats(tmp_path) is None
    (tmp_path / "map").mkdir()
    bad = {"size": data[:-1], "magic": b"X" + data[1:], "version": data[:8] + b"\x09" + data[9:],
           "checksum": data[:100] + bytes([data[100] ^ 1]) + data[101:]}
    for why, blob in bad.items():
        (tmp_path / "map" / "stats").write_bytes(blob)
        with pytest.raises(mmsb.SerializationError):
            read_stats(tmp_path)
        assert (tmp_path / "map" / "stats").read_bytes() == blob, why  # nothing rewritten
    assert len(data) == SIZE == 1292


def test_publications_of_the_counters_from_two_threads_never_collide(tmp_path: Path) -> None:
    """A checkpoint and the writer's background thread both publish DIR/map/stats: they
    shared one temporary file, and a rename could find it already renamed by the other
    (FileNotFoundError, logged as "publishing the latency counters ... failed")."""
    import threading

    from mmsb._core.monitor import Counters
    from mmsb._storage.stats_file import decode_stats, publish_stats

    (tmp_path / "map").mkdir()
    c = Counters()
    c.delta_apply.add(5)
    errors: list[BaseException] = []

    def publish() -> None:
        for _ in range(300):
            try:
                publish_stats(tmp_path / "map", c, 7)
            except BaseException as exc:  # (reported below)
                errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert decode_stats((tmp_path / "map" / "stats").read_bytes())["last_lsn"] == 7
    assert sorted(p.name for p in (tmp_path / "map").iterdir()) == ["stats"]


def test_a_first_publication_removes_what_killed_publishers_left(tmp_path: Path) -> None:
    """A publisher killed between its write and its rename leaves its stats.PID.tmp: the
    next process's first publication to the folder removes each one whose process no
    longer runs, and leaves a live process's and any other name alone."""
    import subprocess
    import sys

    from mmsb._storage.stats_file import publish_stats

    map_dir = tmp_path / "map"
    map_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"stats.{gone.pid}.tmp", f"stats.{live.pid}.tmp", "stats.x.tmp", "notes"):
            (map_dir / name).write_bytes(b"left")
        (map_dir / "stats.0.tmp").mkdir()  # (not a file: left as it is, nothing fails)
        from mmsb._core.monitor import Counters

        publish_stats(map_dir, Counters(), 3)
        assert sorted(p.name for p in map_dir.iterdir()) == sorted(
            ["notes", "stats", "stats.0.tmp", f"stats.{live.pid}.tmp", "stats.x.tmp"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("fsync", ["batch", "always", "none"])
def test_writer_publishes_its_counters_while_it_writes(tmp_path: Path, fsync: str) -> None:
    """From the writer's background thread (the group commit's, or one of its own when
    there is no group commit), without a checkpoint; an inspector of the bus charts them
    and never writes the file itself."""
    import time

    from mmsb._storage.stats_file import read_stats

    path = tmp_path / "pub"
    state = mmsb.mmsb_start(enable_gpu=False, path=path, config=mmsb.MMSBConfig(
        enable_gpu=False, fsync=fsync, checkpoint_interval=0, max_tlog_size=10**6))
    try:
        pid = mmsb.create_page(state, 16).id
        checkpoints = state.counters.checkpoint.count
        for k in range(50):
            mmsb.write_page(state, pid, k % 12, (k + 1).to_bytes(4, "little"))
        deadline = time.monotonic() + 10
        pub = read_stats(path)
        while (pub is None or pub["kinds"]["delta_apply"]["count"] < 50) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
            pub = read_stats(path)
        assert pub is not None and pub["kinds"]["delta_apply"]["count"] == 50
        # No checkpoint ran meanwhile: the background thread published them.
        assert state.counters.checkpoint.count == checkpoints
        assert pub["kinds"]["checkpoint"]["count"] == checkpoints
        assert pub["pid"] == os.getpid() and pub["last_lsn"] <= state.last_lsn
        stats_file = path / "map" / "stats"
        inspected = Inspected(path)
        try:
            c = TestClient(create_app(inspected, lambda: {"testserver"}))
            raw = stats_file.read_bytes()
            w = get(c, "/api/stats")["writer"]
            assert w["kinds"]["delta_apply"]["count"] == 50 and w["pid"] == os.getpid()
            assert sum(w["kinds"]["delta_apply"]["hist"]["counts"]) == 50
            assert stats_file.read_bytes() == raw
        finally:
            inspected.close()
    finally:
        mmsb.mmsb_stop(state)


@pytest.mark.parametrize(("url", "status", "kind"), [
    ("/api/pages/99/blame", 404, "PageNotFoundError"),
    ("/api/pages/99/heat", 404, "PageNotFoundError"),
    ("/api/pages/x/version", 400, "InvalidArgumentError"),
    ("/api/pages/0/history", 400, "InvalidArgumentError"),
    ("/api/pages/1/version?lsn=999999", 400, "InvalidArgumentError"),
    ("/api/pages/1/version?lsn=-1", 400, "InvalidArgumentError"),
    ("/api/pages/1/version?length=1000000", 400, "InvalidArgumentError"),
    ("/api/pages/1/heat?mode=loud", 400, "InvalidArgumentError"),
    ("/api/heat?mode=loud", 400, "InvalidArgumentError"),
    ("/api/heat?limit=100000", 400, "InvalidArgumentError"),
    ("/api/heat?cols=0", 400, "InvalidArgumentError"),
    ("/api/graph?lsn=999999", 400, "InvalidArgumentError"),
    ("/api/graph?lsn=1e3", 400, "InvalidArgumentError"),
    ("/api/timeline?bins=0", 400, "InvalidArgumentError"),
    ("/api/timeline?lo=9&hi=3", 400, "InvalidArgumentError"),
    ("/api/timeline?axis=epoch", 400, "InvalidArgumentError"),
    ("/api/timeline?axis=time&bins=2001", 400, "InvalidArgumentError"),
    ("/api/timeline?axis=time&lo=soon", 400, "InvalidArgumentError"),
    ("/api/log?page=abc", 400, "InvalidArgumentError"),
    ("/api/events?since=-4", 400, "InvalidArgumentError"),
    ("/api/nowhere", 404, "NotFound"),
    ("/api/log?page=99999999999999999999999", 400, "InvalidArgumentError"),
    ("/api/timeline?hi=99999999999999999999999", 400, "InvalidArgumentError"),
    ("/api/pages/99999999999999999999999/heat", 400, "InvalidArgumentError"),
    ("/api/pages/1/version?offset=99999999999999999999999", 400, "InvalidArgumentError"),
])
def test_bad_requests_get_typed_errors_and_change_nothing(client: TestClient, demo_bus: Path,
                                                          url: str, status: int,
                                                          kind: str) -> None:
    before = _files_digest(demo_bus)
    body = get(client, url, status)
    assert body["error"]["type"] == kind and body["error"]["message"]
    assert _files_digest(demo_bus) == before


def test_host_and_method_guard(client: TestClient, demo_bus: Path) -> None:
    before = _files_digest(demo_bus)
    r = client.get("/api/summary", headers={"host": "attacker.example"})
    assert r.status_code == 421 and r.json()["error"]["type"] == "HostNotAllowed"
    r = client.get("/", headers={"host": "127.0.0.1.attacker.example"})
    assert r.status_code == 421
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = client.request(method, "/api/pages/1/version")
        assert r.status_code == 405 and r.json()["error"]["type"] == "ReadOnly"
    assert _files_digest(demo_bus) == before


def test_static_front_end_is_served(client: TestClient) -> None:
    html = client.get("/").text
    assert "<script src=\"/app.js\">" in html and "cdn" not in html.lower()
    js = client.get("/app.js")
    assert js.status_code == 200 and "EventSource" in js.text
    assert "http" not in re.sub(r"//.*", "", js.text)  # nothing fetched from elsewhere


def test_checkpoint_file(tmp_path: Path) -> None:
    state = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    p = mmsb.create_page(state, 8)
    mmsb.write_page(state, p.id, 2, b"\x01\x02", source="batch")
    ck = tmp_path / "state.ckpt"
    mmsb.checkpoint_log(state, ck)
    inspected = Inspected(ck)
    try:
        c = TestClient(create_app(inspected, lambda: {"testserver"}))
        s = get(c, "/api/summary")
        assert (s["kind"], s["live"]) == ("checkpoint", False)
        assert sum(get(c, "/api/timeline?source=batch")["series"]["batch"]) == 1
        assert get(c, "/api/pages/1/version")["changed"] == [2, 3]
        assert get(c, "/api/events", 404)["error"]["type"] == "NotLive"
    finally:
        inspected.close()


def test_timeline_is_aggregated_on_a_large_log(tmp_path: Path) -> None:
    state = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=10**7))
    ids = [p.id for p in mmsb.create_pages(state, 64, 64)]
    rng = np.random.default_rng(7)
    for _ in range(20):
        mmsb.apply_batch(state, [(int(ids[k]), int(o), b"\x01\x02")
                                 for k, o in zip(rng.integers(0, 64, 5000),
                                                 rng.integers(0, 62, 5000), strict=True)])
    ck = tmp_path / "big.ckpt"
    mmsb.checkpoint_log(state, ck)
    inspected = Inspected(ck)
    try:
        c = TestClient(create_app(inspected, lambda: {"testserver"}))
        r = c.get(f"/api/timeline?bins={MAX_BINS}")
        t = r.json()
        assert sum(map(sum, t["series"].values())) == len(state.log.records)
        assert len(t["edges"]) == MAX_BINS + 1 and len(r.content) < 200_000
        r = c.get(f"/api/timeline?axis=time&bins={MAX_BINS}")
        t = r.json()
        assert sum(map(sum, t["series"].values())) == len(state.log.records)
        assert len(t["edges"]) <= MAX_BINS + 1 and len(r.content) < 300_000
        log = get(c, "/api/log?limit=500")
        assert log["total"] == len(state.tlog) and len(log["rows"]) == 500
        assert len(bytes.fromhex(get(c, "/api/pages/1/version?length=4096")["hex"])) == 64
        assert MAX_BYTES == 4096
    finally:
        inspected.close()


def _varied_history(max_log: int | None = None, rounds: int = 40) -> mmsb.MMSBState:
    """A log with every kind of record the inspector aggregates: batches of sparse
    writes, masked and full dense deltas, metadata flags, edges added and removed,
    clones, deletions, resizes, and (without ``max_log``) a compression marker half way;
    with ``max_log`` the log is folded into a replay base as it goes."""
    state = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=max_log or 10**7))
    ids = [p.id for p in mmsb.create_pages(state, 300, 61)]
    rng = np.random.default_rng(3)
    for b in range(rounds):
        mmsb.apply_batch(state, [(int(ids[i]), int(o), bytes([b, 1, 2])) for i, o in
                                 zip(rng.integers(0, len(ids), 1500), rng.integers(0, 58, 1500),
                                     strict=True)], source="batch")
        size = state.pages[ids[b]].size
        mask = rng.random(size) < 0.4
        mmsb.route_delta(state, mmsb.create_delta(
            state, ids[b], mask, rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
            source="masked"))
        mmsb.update_page(state, ids[b + 1], bytes([b]) * state.pages[ids[b + 1]].size)
        mmsb.set_metadata(state, ids[b + 2], "stale", b % 2 == 0)
        mmsb.add_dependency(state, ids[b], ids[b + 100], mmsb.CONTROL_DEPENDENCY)
        if b % 5 == 4:
            p, c, _t = state.graph.edges()[0]
            mmsb.remove_dependency(state, p, c)
        if b % 7 == 3:
            clone = mmsb.clone_page(state, ids[b + 3])
            ids.append(clone.id)
            mmsb.add_dependency(state, ids[b + 3], clone.id, mmsb.DATA_DEPENDENCY)
        if b % 9 == 8:
            mmsb.delete_page(state, ids.pop(b + 50))
        if b % 11 == 5:
            mmsb.resize_page(state, ids[b + 4], 80)
        if b == rounds // 2 and max_log is None:
            mmsb.compress_log(state)
    return state


def _reference_page_stats(state: mmsb.MMSBState) -> dict[int, tuple[int, int, int]]:
    """Page id → (deltas, bytes written, newest LSN), one Delta object at a time."""
    out: dict[int, tuple[int, int, int]] = {}
    for d in state.tlog:
        n, b, _lsn = out.get(d.page_id, (0, 0, 0))
        out[d.page_id] = (n + 1, b + d.count, d.lsn)
    return out


def _reference_graph(state: mmsb.MMSBState, lsn: int) -> tuple[dict[int, int], dict[int, Any],
                                                               list[Any]]:
    view = mmsb.replay_to_lsn(state, lsn)
    return ({p: page.epoch for p, page in view.pages.items()},
            {p: dict(page.metadata) for p, page in view.pages.items() if page.metadata},
            view.graph.edges())


@pytest.mark.parametrize("max_log", [None, 20_000])
def test_column_statistics_and_past_graphs_equal_the_slow_reference(max_log: int | None) -> None:
    from mmsb._history.graph_at import graph_at_lsn
    from mmsb._history.stats import log_statistics, page_statistics

    state = _varied_history(max_log)
    assert (state.replay_base is not None) == (max_log is not None)
    assert state.log.horizon_lsn > 0
    sources: dict[str, int] = {}
    changed = sparse = 0
    for d in state.tlog:
        sources[d.source] = sources.get(d.source, 0) + 1
        changed += d.count
        sparse += d.is_sparse
    got = log_statistics(state.log)
    assert (got["bytes_changed"], got["sparse_deltas"], got["sources"]) == (changed, sparse, sources)
    assert list(got["sources"]) == list(sources)  # in the order the deltas meet them
    assert got["total_deltas"] == len(state.tlog) and got["records"] == len(state.log.records)
    assert got["first_lsn"] == state.log.records[0].lsn
    assert page_statistics(state.log) == _reference_page_stats(state)
    assert mmsb.get_stats(state).total_delta_bytes == changed
    for lsn in np.linspace(state.log.horizon_lsn, state.last_lsn, 12).astype(int).tolist():
        past = graph_at_lsn(state, lsn)
        assert (past.epochs, past.metadata, past.edges) == _reference_graph(state, lsn), lsn


def test_large_log_answers_equal_the_slow_reference(tmp_path: Path) -> None:
    """Page table, summary, stats and past graphs of a log of ~41,000 records (84,000
    LSNs, compressed half way), served from the log's columns and structural records,
    against one Delta object at a time and replay_to_lsn."""
    state = _varied_history(rounds=58)
    ck = tmp_path / "varied.ckpt"
    mmsb.checkpoint_log(state, ck)
    loaded = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False, max_tlog_size=10**7))
    mmsb.load_checkpoint(loaded, ck)
    assert len(loaded.log.records) > 40_000
    inspected = Inspected(ck)
    try:
        c = TestClient(create_app(inspected, lambda: {"testserver"}))
        ref = _reference_page_stats(loaded)
        rows = get(c, "/api/pages?limit=500")["rows"]
        assert [r["id"] for r in rows] == list(loaded.pages)
        for r in rows:
            want = ref.get(r["id"], (0, 0, None))
            assert (r["deltas"], r["bytes_written"], r["last_lsn"]) == want, r["id"]
        log = get(c, "/api/summary")["log"]
        assert log["bytes_changed"] == sum(b for _n, b, _l in ref.values())
        assert log["deltas"] == len(loaded.tlog)
        assert log["sparse_deltas"] == sum(d.is_sparse for d in loaded.tlog)
        assert get(c, "/api/stats")["stats"]["total_delta_bytes"] == log["bytes_changed"]
        for lsn in np.linspace(loaded.log.horizon_lsn, loaded.last_lsn, 8).astype(int).tolist():
            g = get(c, f"/api/graph?lsn={lsn}")
            epochs, meta, edges = _reference_graph(loaded, lsn)
            assert {n["id"]: n["epoch"] for n in g["nodes"]} == epochs
            assert {n["id"] for n in g["nodes"] if n["stale"]} == {
                p for p, m in meta.items() if m.get("stale")}
            assert [(e["parent"], e["child"], e["type"]) for e in g["edges"]] == [
                (p, ch, mmsb.EdgeType(t).name) for p, ch, t in edges]
        before = loaded.log.horizon_lsn - 1
        assert get(c, f"/api/graph?lsn={before}", 400)["error"]["type"] == "InvalidArgumentError"
    finally:
        inspected.close()


# -- the command ---------------------------------------------------------------------------

class Served:
    """``mmsb ui PATH`` in a subprocess; ``url`` is what it printed."""

    def __init__(self, path: Path, port: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mmsb", "ui", str(path), "--port",
                                      str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"no URL printed: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = m.group(1)

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err


@pytest.fixture
def served(demo_bus: Path) -> Iterator[Served]:
    s = Served(demo_bus)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_command_serves_read_only_and_stops_cleanly(served: Served, demo_bus: Path) -> None:
    import httpx

    before = _files_digest(demo_bus)
    r = httpx.get(served.url + "api/summary", timeout=10)
    assert r.status_code == 200 and r.json()["kind"] == "bus"
    port = served.url.rsplit(":", 1)[1].rstrip("/")
    assert httpx.get(f"http://localhost:{port}/api/summary", timeout=10).status_code == 200
    assert httpx.get(served.url + "api/summary", headers={"host": f"evil.example:{port}"},
                     timeout=10).status_code == 421
    rc, out, err = served.stop()
    assert rc == 0 and "stopped" in out and "Traceback" not in err
    assert _files_digest(demo_bus) == before


def test_command_without_the_extra_is_one_line(demo_bus: Path, tmp_path: Path) -> None:
    fake = tmp_path / "starlette"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('missing (test)')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path),
                                                              ENV.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "mmsb", "ui", str(demo_bus)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "pip install 'mmsb[ui]'" in r.stderr
    assert r.stderr.startswith("mmsb: error: ")
    ok = subprocess.run([sys.executable, "-m", "mmsb", "log", str(demo_bus)],
                        capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0  # the other commands work without it


def test_command_refuses_a_directory_that_is_not_a_bus(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mmsb", "ui", str(tmp_path)],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and "not an MMSB bus" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_live_feed_follows_a_writer(tmp_path: Path) -> None:
    import httpx

    path = tmp_path / "live"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        page = mmsb.create_page(state, 16)
        s = Served(path)
        try:
            since = state.last_lsn
            with httpx.stream("GET", s.url + f"api/events?since={since}", timeout=20) as r:
                assert r.status_code == 200
                mmsb.write_page(state, page.id, 0, b"hello")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        ev = json.loads(line[6:])
                        break
            assert (ev["lsn"], ev["page"], ev["type"]) == (state.last_lsn, page.id, "PAGE_CHANGED")
            # The views follow too: the server reopens when the writer has moved on.
            v = httpx.get(s.url + f"api/pages/{page.id}/version", timeout=10).json()
            assert bytes.fromhex(v["hex"]).startswith(b"hello") and v["changed"] == [0, 1, 2, 3, 4]
        finally:
            rc, _out, err = s.stop()
            assert rc == 0, err
    finally:
        mmsb.mmsb_stop(state)


def _sse_blocks(lines: Iterator[str], want: int) -> list[dict[str, str]]:
    """The first ``want`` server-sent events that carry data, each as its fields."""
    out: list[dict[str, str]] = []
    block: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in block:
                out.append(block)
                if len(out) == want:
                    break
            block = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            block[name] = value
    return out


def test_live_feed_resumes_after_the_last_event_id(tmp_path: Path) -> None:
    import httpx

    path = tmp_path / "resume"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        a = mmsb.create_page(state, 16).id
        b = mmsb.create_page(state, 16).id
        mmsb.add_dependency(state, a, b, mmsb.CONTROL_DEPENDENCY)
        start = state.last_lsn
        for k in range(4):
            mmsb.write_page(state, a, k, b"x")
            mmsb.create_pages(state, 3, 8)  # one record, an event per page
        reader = mmsb.attach(path)
        try:
            want = [(ev.lsn, ev.type.name, ev.page_id) for ev in reader.changes(start)]
        finally:
            reader.close()
        assert len({lsn for lsn, _t, _p in want}) < len(want)  # LSNs with several events
        s = Served(path)
        try:
            with httpx.stream("GET", s.url + f"api/events?since={start}", timeout=20) as r:
                got = _sse_blocks(r.iter_lines(), len(want))
            assert [(json.loads(x["data"])["lsn"], json.loads(x["data"])["type"],
                     json.loads(x["data"])["page"]) for x in got] == want
            # The id marks the last event of each LSN, and only that one.
            for k, x in enumerate(got):
                lsn = want[k][0]
                last_of_lsn = k + 1 == len(want) or want[k + 1][0] != lsn
                assert x.get("id") == (str(lsn) if last_of_lsn else None)
            # A reconnect with Last-Event-ID resumes after it, whatever since says.
            mid = want[len(want) // 2][0]
            after = [w for w in want if w[0] > mid]
            with httpx.stream("GET", s.url + f"api/events?since={start}", timeout=20,
                              headers={"Last-Event-ID": str(mid)}) as r:
                got = _sse_blocks(r.iter_lines(), len(after))
            assert [json.loads(x["data"])["lsn"] for x in got] == [w[0] for w in after]
            bad = httpx.get(s.url + "api/events", headers={"Last-Event-ID": "yesterday"},
                            timeout=10)
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "InvalidArgumentError"
        finally:
            rc, _out, err = s.stop()
            assert rc == 0, err
    finally:
        mmsb.mmsb_stop(state)


# -- the browser ---------------------------------------------------------------------------

def _browser() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium executable at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


@contextlib.contextmanager
def _chromium_page(timeout_ms: int = 10_000) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page (Debian's executable) and the list its console errors
    and page errors go to."""
    sync_api = _browser()
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


@pytest.fixture
def browser_page(served: Served) -> Iterator[tuple[Any, list[str]]]:
    with _chromium_page() as page_and_errors:
        yield page_and_errors


def _shots() -> Path:
    return Path(os.environ.get("MMSB_UI_SCREENSHOTS", "")) if os.environ.get(
        "MMSB_UI_SCREENSHOTS") else Path()


def _rendered(page: Any) -> None:
    """Wait until the view on screen is the one of the current address."""
    page.wait_for_function("document.getElementById('view').dataset.done === location.hash")


def test_every_view_in_a_browser(browser_page: tuple[Any, list[str]], served: Served,
                                 demo_bus: Path, tmp_path: Path) -> None:
    page, errors = browser_page
    shots = _shots() if os.environ.get("MMSB_UI_SCREENSHOTS") else tmp_path
    state = mmsb.open_readonly(demo_bus)
    deltas = mmsb.query_log(state)

    page.goto(served.url + "#/timeline")
    page.wait_for_selector("#log tr td")
    assert page.locator("#chart rect.bar").count() > 0
    lsns = page.locator("#log a.lsnlink").all_inner_texts()
    assert lsns == [str(d.lsn) for d in deltas]
    assert f"last LSN {state.last_lsn}" in page.inner_text("#where")
    page.screenshot(path=str(shots / "timeline.png"))

    page.goto(served.url + "#/pages")
    page.wait_for_selector("#heat div")
    ids = page.locator("#pages a.pagelink").all_inner_texts()
    assert ids == [str(i) for i in state.pages]
    assert page.locator("#heat div").count() == state.pages[1].size
    assert "sensor.raw" in page.inner_text("#pages")
    # The heat map across pages: a row per page, a cell per byte (pages of <= 64 bytes),
    # each titled with the deltas that wrote it.
    page.wait_for_selector("#heatall rect.hcell")
    assert page.locator("#heatall text.hrow").all_text_contents() == [str(i) for i in state.pages]
    assert page.locator("#heatall rect.hcell").count() == sum(
        min(64, p.size) for p in state.pages.values())
    written = {int(i) for i in page.locator("#heatall rect.hcell").evaluate_all(
        "cs => cs.filter(c => !c.textContent.includes(' 0 deltas')).map(c => c.dataset.page)")}
    assert written == {p for p in state.pages if mmsb.get_deltas_for_page(state, p)}
    page.screenshot(path=str(shots / "pages.png"), full_page=True)
    # A page id in that map opens its byte-level map.
    page.locator("#heatall a", has_text="2").first.click()
    page.wait_for_function("location.hash.includes('heat=2')")
    _rendered(page)
    assert page.locator("#heat div").count() == state.pages[2].size
    page.goto(served.url + "#/pages")
    page.wait_for_selector("#heat div")

    # Click a page id: its history, newest version, bytes on screen.
    page.locator("#pages a.pagelink", has_text="2").first.click()
    page.wait_for_selector("#hex")
    assert page.url.endswith("#/page/2")
    data = mmsb.query_page(state, 2)
    assert data[:16].hex(" ") in page.inner_text("#hex").replace("\n", " ")
    assert "propagation" in page.inner_text("#blame")
    page.screenshot(path=str(shots / "page-history.png"))

    # Step to the older version: the bytes of read_page_at at that LSN.
    versions = [d.lsn for d in mmsb.get_deltas_for_page(state, 2)]
    page.click("#prev")
    page.wait_for_function(f"document.getElementById('vlsn').textContent === '{versions[-2]}'")
    older = mmsb.read_page_at(state, 2, lsn=versions[-2])
    assert older[:16].hex(" ") in page.inner_text("#hex").replace("\n", " ")
    assert page.locator("#hex b").count() > 0  # changed bytes highlighted

    page.goto(served.url + "#/graph")
    page.wait_for_selector("#graph circle.node")
    assert sorted(page.locator("#graph circle.node").evaluate_all(
        "ns => ns.map(n => Number(n.dataset.id))")) == sorted(state.pages)
    assert "(stale)" in (page.text_content("#graph") or "")
    page.screenshot(path=str(shots / "graph.png"))
    page.fill("#g-lsn-n", str(deltas[0].lsn - 1))
    page.click("#g-go")
    page.wait_for_function(f"location.hash === '#/graph?lsn={deltas[0].lsn - 1}'")
    page.wait_for_selector(f"h2:has-text('LSN {deltas[0].lsn - 1}')")
    assert "(stale)" not in (page.text_content("#graph") or "")
    page.locator("#graph a").first.click()
    page.wait_for_selector("#hex")

    page.goto(served.url + "#/stats")
    page.wait_for_selector("#stats")
    assert page.locator("#sizes rect").count() > 0
    assert "total_pages" in page.inner_text("#stats")
    # The writer's published latency: percentiles and a histogram per kind it sampled.
    assert "pid" in page.inner_text("#writer-when")
    kinds = page.locator("#writer .wkind").evaluate_all("ks => ks.map(k => k.dataset.kind)")
    assert {"delta_apply", "checkpoint"} <= set(kinds)
    assert page.locator("#writer .wkind svg").count() == 2 * len(kinds)
    page.screenshot(path=str(shots / "stats.png"))

    # A bad page id in the address bar: the typed error on screen, not a broken page.
    page.goto(served.url + "#/page/99")
    page.wait_for_selector("#error:not([hidden])")
    assert "PageNotFoundError" in page.inner_text("#error")
    errors = [e for e in errors if "404" not in e]  # the refused request itself
    assert errors == []
    assert all((shots / f"{n}.png").stat().st_size > 0
               for n in ("timeline", "pages", "page-history", "graph", "stats"))


def test_timeline_zoom_and_click_through(browser_page: tuple[Any, list[str]],
                                         served: Served, demo_bus: Path) -> None:
    page, errors = browser_page
    state = mmsb.open_readonly(demo_bus)
    page.goto(served.url + "#/timeline")
    page.wait_for_selector("#chart rect.bar")
    box = page.locator("#chart").bounding_box()
    y = box["y"] + 100
    page.mouse.move(box["x"] + 500, y)
    page.mouse.down()
    page.mouse.move(box["x"] + 950, y)
    page.mouse.up()
    page.wait_for_function("location.hash.includes('lo=')")
    page.wait_for_selector("#zoom-out:not([disabled])")
    page.select_option("#f-source", "propagation")
    page.click("#f-apply")
    page.wait_for_function("location.hash.includes('source=propagation')")
    _rendered(page)
    shown = page.locator("#log tr td:nth-child(5)").all_inner_texts()
    assert shown and set(shown) == {"propagation"}
    first = page.locator("#log a.lsnlink").first
    lsn = first.inner_text()
    first.click()
    page.wait_for_selector("#vlsn")
    assert page.inner_text("#vlsn") == lsn
    d = next(d for d in mmsb.query_log(state) if str(d.lsn) == lsn)
    assert page.url.endswith(f"#/page/{d.page_id}?lsn={lsn}")
    assert errors == []


def test_timeline_time_axis_in_a_browser(browser_page: tuple[Any, list[str]],
                                         served: Served, demo_bus: Path,
                                         tmp_path: Path) -> None:
    page, errors = browser_page
    shots = _shots() if os.environ.get("MMSB_UI_SCREENSHOTS") else tmp_path
    state = mmsb.open_readonly(demo_bus)
    deltas = mmsb.query_log(state)
    page.goto(served.url + "#/timeline")
    page.wait_for_selector("#chart rect.bar")
    page.click("#axis-time")
    page.wait_for_function("location.hash.includes('axis=time')")
    _rendered(page)
    assert page.locator("#chart").get_attribute("data-axis") == "time"
    assert page.locator("#axis-time.on").count() == 1
    ticks = page.locator("#chart text.tick").all_text_contents()
    assert ticks and all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}", x) for x in ticks)
    assert page.locator("#log a.lsnlink").all_inner_texts() == [str(d.lsn) for d in deltas]
    page.screenshot(path=str(shots / "timeline-time.png"))
    # Zoom by dragging over the right half: the address holds a window of microseconds.
    box = page.locator("#chart").bounding_box()
    page.mouse.move(box["x"] + 500, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 950, box["y"] + 100)
    page.mouse.up()
    page.wait_for_function("location.hash.includes('lo=') && location.hash.includes('axis=time')")
    _rendered(page)
    lo = int(re.search(r"lo=(\d+)", page.url).group(1))
    assert lo > state.log.records[0].timestamp // 1000
    page.wait_for_selector("#zoom-out:not([disabled])")
    # A bar lists the records of its time bin, by their LSN range.
    page.locator("#chart rect.bar").last.click()
    page.wait_for_function("location.hash.includes('blo=')")
    _rendered(page)
    blo = int(re.search(r"blo=(\d+)", page.url).group(1))
    bhi = int(re.search(r"bhi=(\d+)", page.url).group(1))
    shown = [int(x) for x in page.locator("#log a.lsnlink").all_inner_texts()]
    assert shown == [d.lsn for d in deltas if blo <= d.lsn <= bhi]
    page.click("#axis-lsn")
    page.wait_for_function("!location.hash.includes('axis=time')")
    _rendered(page)
    assert page.locator("#chart").get_attribute("data-axis") == "lsn"
    assert errors == []


def test_live_view_follows_new_records(tmp_path: Path) -> None:
    _browser()  # skips without Chromium or Playwright
    path = tmp_path / "live"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        page_id = mmsb.create_page(state, 16).id
        s = Served(path)
        try:
            with _chromium_page(10_000) as (page, errors):
                page.goto(s.url + f"#/page/{page_id}")
                page.wait_for_selector("#live.on")
                mmsb.write_page(state, page_id, 0, b"ABCD")
                lsn = state.last_lsn
                page.wait_for_function(
                    f"document.getElementById('live').textContent.includes('LSN {lsn}')")
                page.wait_for_function(
                    f"document.getElementById('vlsn').textContent === '{lsn}'")
                assert "ABCD" in page.inner_text("#hex")
        finally:
            rc, _out, err = s.stop()
            assert rc == 0, err
        assert errors == []
    finally:
        mmsb.mmsb_stop(state)


def test_live_view_resumes_after_the_server_comes_back(tmp_path: Path) -> None:
    """The inspector stops while the writer goes on, and starts again on the same port:
    the page reconnects, sends the last LSN it saw (Last-Event-ID) and gets exactly the
    events it missed, none twice."""
    import socket

    _browser()  # skips without Chromium or Playwright
    path = tmp_path / "live"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        page_id = mmsb.create_page(state, 16).id
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        s = Served(path, port)
        try:
            with _chromium_page(15_000) as (page, errors):
                page.goto(s.url + f"#/page/{page_id}")
                page.wait_for_selector("#live.on")
                since = state.last_lsn
                mmsb.write_page(state, page_id, 0, b"ABCD")
                page.wait_for_function(
                    f"document.getElementById('live').dataset.lastId === '{state.last_lsn}'")
                rc, _out, err = s.stop()
                assert rc == 0, err
                page.wait_for_function(
                    "document.getElementById('live').textContent.includes('reconnecting')")
                mmsb.write_page(state, page_id, 4, b"EFGH")
                mmsb.create_pages(state, 2, 8)
                mmsb.write_page(state, page_id, 8, b"IJKL")
                lsn = state.last_lsn
                s = Served(path, port)
                page.wait_for_function(
                    f"document.getElementById('live').dataset.lastId === '{lsn}'")
                reader = mmsb.attach(path)
                try:
                    missed = len(list(reader.changes(since)))
                finally:
                    reader.close()
                live = page.locator("#live")
                assert live.get_attribute("data-events") == str(missed)
                assert live.get_attribute("data-resumes") == "1"
                page.wait_for_function(
                    f"document.getElementById('vlsn').textContent === '{lsn}'")
                assert "ABCDEFGHIJKL" in page.inner_text("#hex").replace("\n", "")
        finally:
            if s.proc.poll() is None:
                rc, _out, err = s.stop()
                assert rc == 0, err
        # The cut stream and the refused reconnects while the server was down are the
        # only errors.
        assert {e.rsplit("::", 1)[-1] for e in errors} <= {
            "ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING"}, errors
    finally:
        mmsb.mmsb_stop(state)


def test_views_stay_consistent_beside_a_busy_writer(tmp_path: Path) -> None:
    import threading

    import httpx

    path = tmp_path / "busy"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        ids = [mmsb.create_page(state, 32).id for _ in range(4)]
        s = Served(path)
        stop = threading.Event()

        def write() -> None:
            k = 0
            while not stop.is_set() and k < 2000:
                mmsb.write_page(state, ids[k % 4], k % 28, k.to_bytes(4, "little"))
                k += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            with httpx.Client(base_url=s.url, timeout=20) as c:
                for k in range(40):
                    t = c.get("/api/timeline?bins=50")
                    assert t.status_code == 200, t.text
                    body = t.json()
                    # Counts are those of one consistent state: bins add up to its records.
                    assert sum(map(sum, body["series"].values())) <= body["last_lsn"]
                    v = c.get(f"/api/pages/{ids[k % 4]}/version")
                    assert v.status_code == 200, v.text
                    assert len(bytes.fromhex(v.json()["hex"])) == 32
                    assert c.get(f"/api/graph?lsn={body['last_lsn']}").status_code == 200
        finally:
            stop.set()
            writer.join()
            rc, _out, err = s.stop()
        assert rc == 0, err
    finally:
        mmsb.mmsb_stop(state)
