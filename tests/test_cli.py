"""The ``mmsb`` command, driven as a user drives it: a subprocess on a durable bus made
by ``mmsb demo --path DIR`` and on checkpoint files. ``--json`` output is checked
against the library's own view of the same files; errors must be one line on stderr
with exit status 2 and no traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmsb
from mmsb._storage.bus import bus_files
from mmsb.cli.views import blame, format_time, parse_range, parse_time

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OPENBLAS_NUM_THREADS": "1"}
if ENV.get("PYTHONPATH"):
    # (Absolute: some commands run in a working folder of their own.)
    ENV["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p
                                        for p in ENV["PYTHONPATH"].split(os.pathsep))


def mmsb_cmd(*args: Any, check: int | None = 0,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mmsb.cli ARGS`` (in ``cwd``); with ``check``, assert that exit
    status."""
    r = subprocess.run([sys.executable, "-m", "mmsb", *map(str, args)],
                       capture_output=True, text=True, env=ENV, timeout=60, cwd=cwd)
    if check is not None:
        assert r.returncode == check, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def mmsb_json(*args: Any) -> Any:
    return json.loads(mmsb_cmd(*args, "--json").stdout)


def mmsb_jsons(*argvs: tuple[Any, ...]) -> list[Any]:
    """Several independent ``--json`` runs at once (each command is mostly start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda argv: mmsb_json(*argv), argvs))


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "demo-bus"
    r = mmsb_cmd("demo", "--path", path)
    assert "done" in r.stdout
    assert (path / "BUS").is_file()
    return path


@pytest.fixture(scope="module")
def lib(bus: Path) -> mmsb.MMSBState:
    """The library's own read of the demo bus."""
    return mmsb.open_readonly(bus)


def _crafted_state() -> mmsb.MMSBState:
    """Pages whose blame is known by construction (LSNs in the comments).

    page 1 (32 B): 0:16 ← 0x01 (L2); 8:24 ← 0x02 (L3); 4:8 ← 0x03 (L4); 24:32 untouched.
    page 2 (16 B): 0:16 ← 0x05 (L6); shrunk to 8 (L7), grown to 16 (L8); 12:14 ← 0x06 (L9).
    page 3: clone of page 1 (L10), then 0:2 ← 0x09 (L11).
    """
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.create_page(s, 32, metadata={"name": "crafted"})
    mmsb.write_page(s, 1, 0, b"\x01" * 16)
    mmsb.write_page(s, 1, 8, b"\x02" * 16)
    mmsb.write_page(s, 1, 4, b"\x03" * 4)
    mmsb.create_page(s, 16)
    mmsb.write_page(s, 2, 0, b"\x05" * 16)
    mmsb.resize_page(s, 2, 8)
    mmsb.resize_page(s, 2, 16)
    mmsb.write_page(s, 2, 12, b"\x06\x06")
    mmsb.clone_page(s, 1)
    mmsb.write_page(s, 3, 0, b"\x09\x09")
    assert s.last_lsn == 11
    return s


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "crafted.mmsbckpt"
    mmsb.checkpoint_log(_crafted_state(), path)
    return path


def _ranges(doc: dict[str, Any]) -> list[tuple[int, int, str, int | None]]:
    return [(r["start"], r["stop"], r["status"], r.get("lsn")) for r in doc["ranges"]]


# -- demo, inspect ------------------------------------------------------------------------

def test_demo_in_memory_runs() -> None:
    r = mmsb_cmd("demo")
    assert "Live state equals the replay of its log: True" in r.stdout


def test_bare_command_shows_usage_and_version() -> None:
    bare, version = mmsb_cmd(check=None), mmsb_cmd("--version")
    assert "Usage: mmsb" in bare.stdout + bare.stderr and "error" not in bare.stderr
    assert version.stdout.startswith("mmsb, version ")


def test_inspect_json_matches_library(bus: Path, lib: mmsb.MMSBState) -> None:
    doc = mmsb_json("inspect", bus)
    assert doc["kind"] == "bus"
    want = [{"id": pid, "size": p.size, "epoch": p.epoch, "location": str(p.location),
             "metadata": dict(p.metadata)} for pid, p in lib.pages.items()]
    got = [{k: row[k] for k in ("id", "size", "epoch", "location", "metadata")}
           for row in doc["pages"]]
    assert got == want
    stats = mmsb.compute_log_statistics(lib)
    assert doc["log"]["records"] == stats["records"] == len(lib.log.records)
    assert doc["log"]["deltas"] == len(lib.tlog)
    assert (doc["log"]["first_lsn"], doc["log"]["last_lsn"]) == (1, lib.last_lsn)
    assert doc["log"]["sources"] == stats["sources"]
    assert {(e["parent"], e["child"], e["type"]) for e in doc["edges"]} == {
        (1, 2, "DATA"), (1, 3, "CONTROL")}
    files = bus_files(bus)
    assert [c["name"] for c in doc["bus"]["checkpoints"]] == [p.name for p in files["checkpoints"]]
    newest = doc["bus"]["checkpoints"][-1]
    assert newest["status"] == "ok" and newest["lsn"] == lib.last_lsn
    assert newest["generation"] == doc["bus"]["generation"]
    assert [w["status"] for w in doc["bus"]["wal"] if w["generation"] == newest["generation"]] == ["ok"]
    assert doc["notes"] == []


def test_inspect_table(bus: Path) -> None:
    out = mmsb_cmd("inspect", bus).stdout
    for text in ("sensor.raw", "dependency edges", "checkpoint files", "log segments",
                 "recovery notes: none", "CONTROL"):
        assert text in out


def test_inspect_checkpoint_file(crafted: Path) -> None:
    doc = mmsb_json("inspect", crafted)
    assert doc["kind"] == "checkpoint"
    assert [p["id"] for p in doc["pages"]] == [1, 2, 3]
    assert doc["pages"][0]["metadata"] == {"name": "crafted"}
    assert doc["checkpoint"]["lsn"] == 11 and doc["checkpoint"]["status"] == "ok"
    assert "checkpoint file" in mmsb_cmd("inspect", crafted).stdout


# -- log ------------------------------------------------------------------------------------

def test_log_json_and_filters(bus: Path, lib: mmsb.MMSBState) -> None:
    deltas = list(lib.tlog)
    mid = deltas[2]
    iso = format_time(mid.timestamp)
    assert iso is not None
    doc, page1, prop, last2, exact, after = mmsb_jsons(
        ("log", bus), ("log", bus, "--page", 1), ("log", bus, "--source", "propagation"),
        ("log", bus, "--limit", 2), ("log", bus, "--since", iso, "--until", iso),
        ("log", bus, "--since", mid.timestamp))
    assert [r["lsn"] for r in doc["deltas"]] == [d.lsn for d in deltas]
    first = doc["deltas"][0]
    d0 = deltas[0]
    assert (first["page"], first["base_epoch"], first["epoch"], first["source"], first["bytes"],
            first["kind"], first["timestamp_ns"]) == (
        d0.page_id, d0.base_epoch, d0.epoch, d0.source, d0.count,
        "sparse" if d0.is_sparse else "dense", d0.timestamp)
    assert first["time"] == format_time(d0.timestamp)

    assert [r["lsn"] for r in page1["deltas"]] == [
        d.lsn for d in mmsb.get_deltas_for_page(lib, 1)]
    assert [r["lsn"] for r in prop["deltas"]] == [
        d.lsn for d in deltas if d.source == "propagation"]
    assert [r["lsn"] for r in last2["deltas"]] == [d.lsn for d in deltas[-2:]]
    assert last2["matched"] == len(deltas)
    # --since/--until: the printed ISO time and the integer ns both select exactly.
    assert [r["lsn"] for r in exact["deltas"]] == [
        d.lsn for d in deltas if d.timestamp == mid.timestamp]
    assert [r["lsn"] for r in after["deltas"]] == [
        d.lsn for d in deltas if d.timestamp >= mid.timestamp]


def test_log_table(bus: Path) -> None:
    out = mmsb_cmd("log", bus, "--page", 2).stdout
    assert "propagation" in out and "delta(s) matched" in out


# -- history, blame -------------------------------------------------------------------------

def test_history_json_matches_library(bus: Path, lib: mmsb.MMSBState) -> None:
    doc = mmsb_json("history", bus, 2)
    want = mmsb.get_deltas_for_page(lib, 2)
    assert doc["live"] is True
    assert [(r["lsn"], r["epoch"], r["bytes"], r["source"]) for r in doc["deltas"]] == [
        (d.lsn, d.epoch, d.count, d.source) for d in want]
    for r, d in zip(doc["deltas"], want, strict=True):
        assert r["preview_hex"] == d.values[:16].tobytes().hex()
        covered = np.concatenate([np.arange(a, b) for a, b in r["ranges"]])
        assert np.array_equal(covered, d.indices)
    out = mmsb_cmd("history", bus, 1).stdout
    assert "history of page 1" in out and "@" in out


def test_blame_crafted_pages(crafted: Path) -> None:
    one, two, three, mid, tail = mmsb_jsons(
        ("blame", crafted, 1), ("blame", crafted, 2), ("blame", crafted, 3),
        ("blame", crafted, 1, "--range", "6:10"), ("blame", crafted, 1, "--range", "20:"))
    assert _ranges(one) == [
        (0, 4, "delta", 2), (4, 8, "delta", 4), (8, 24, "delta", 3),
        (24, 32, "never_written", None)]
    row = one["ranges"][1]
    assert (row["epoch"], row["base_epoch"], row["source"], row["preview_hex"]) == (
        3, 2, "api", "03030303")
    assert _ranges(two) == [
        (0, 8, "delta", 6), (8, 12, "never_written", None), (12, 14, "delta", 9),
        (14, 16, "never_written", None)]
    assert _ranges(three) == [(0, 2, "delta", 11), (2, 24, "cloned", 10),
                              (24, 32, "never_written", None)]
    assert three["ranges"][1]["source_page"] == 1
    # --range cuts the same answer.
    assert _ranges(mid) == [(6, 8, "delta", 4), (8, 10, "delta", 3)]
    assert _ranges(tail) == [(20, 24, "delta", 3), (24, 32, "never_written", None)]


def test_blame_table(crafted: Path) -> None:
    table = mmsb_cmd("blame", crafted, 3, "--range", ":26").stdout
    for text in ("0:2", "2:24", "cloned from page 1", "never written", "0909"):
        assert text in table


def test_blame_and_verify_on_trimmed_history(tmp_path: Path) -> None:
    """A bus that keeps one checkpoint: bytes written before the retained history are
    reported as such, and the bus still verifies (replay starts from its base)."""
    path = tmp_path / "bus"
    cfg = mmsb.MMSBConfig(enable_gpu=False, retain_checkpoints=1, checkpoint_interval=0.0001)
    with mmsb.mmsb_start(path=path, config=cfg) as s:
        mmsb.create_page(s, 16)
        for k in range(3):
            time.sleep(0.002)  # past checkpoint_interval: each write checkpoints
            mmsb.write_page(s, 1, 4 * k, b"\x07" * 4)
    lib = mmsb.open_readonly(path)
    horizon = lib.log.horizon_lsn
    assert horizon > 0
    doc, ver = mmsb_jsons(("blame", path, 1), ("verify", path))
    assert _ranges(doc) == [(0, 12, "before_history", None), (12, 16, "never_written", None)]
    assert doc["ranges"][0]["horizon_lsn"] == horizon
    assert ver["ok"] is True


def test_compressed_checkpoint(tmp_path: Path) -> None:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.create_page(s, 32)
    mmsb.write_page(s, 1, 0, b"ab")
    mmsb.write_page(s, 1, 5, b"cd")
    mmsb.compress_log(s)
    mmsb.write_page(s, 1, 1, b"Z")
    path = tmp_path / "compressed.mmsb"
    mmsb.checkpoint_log(s, path)
    ver, doc = mmsb_jsons(("verify", path), ("blame", path, 1, "--range", "0:8"))
    assert ver["ok"] is True
    assert [(r["start"], r["stop"], r.get("source")) for r in doc["ranges"]] == [
        (0, 1, "compressed"), (1, 2, "api"), (2, 5, None), (5, 7, "compressed"), (7, 8, None)]


def test_blame_matches_a_per_byte_reference() -> None:
    """Random overlapping writes: blame's vectorised ranges against the obvious
    per-byte answer built from the same deltas."""
    rng = np.random.default_rng(7)
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    size = 300
    mmsb.create_page(s, size)
    for _ in range(60):
        off = int(rng.integers(0, size - 1))
        n = int(rng.integers(1, min(80, size - off) + 1))
        mmsb.write_page(s, 1, off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    deltas = mmsb.get_deltas_for_page(s, 1)
    want: list[int | None] = [None] * size
    for d in deltas:
        for i in d.indices.tolist():
            want[i] = d.lsn
    got: list[int | None] = [None] * size
    for r in blame(s, 1)["ranges"]:
        for i in range(r["start"], r["stop"]):
            got[i] = r.get("lsn")
    assert got == want


def test_blame_on_bus_tiles_the_page(bus: Path, lib: mmsb.MMSBState) -> None:
    doc = mmsb_json("blame", bus, 1)
    stops = [r["start"] for r in doc["ranges"][1:]]
    assert stops == [r["stop"] for r in doc["ranges"][:-1]]
    assert doc["ranges"][-1]["stop"] == lib.pages[1].size
    assert max(r.get("lsn") or 0 for r in doc["ranges"]) == mmsb.get_deltas_for_page(lib, 1)[-1].lsn


# -- replay, verify, stats ------------------------------------------------------------------

def _same_pages(a: mmsb.MMSBState, b: mmsb.MMSBState) -> bool:
    return (list(a.pages) == list(b.pages)
            and all(mmsb.query_page(a, p) == mmsb.query_page(b, p)
                    and a.pages[p].epoch == b.pages[p].epoch for p in a.pages))


def _load(path: Path) -> mmsb.MMSBState:
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    return mmsb.load_checkpoint(s, path)


def test_replay_writes_past_states(bus: Path, lib: mmsb.MMSBState, tmp_path: Path) -> None:
    lsn = mmsb.get_deltas_for_page(lib, 1)[1].lsn
    ts = lib.tlog[2].timestamp
    at_lsn, at_epoch, at_time = tmp_path / "lsn.mmsb", tmp_path / "epoch.mmsb", tmp_path / "t.mmsb"
    doc, _, _ = mmsb_jsons(("replay", bus, "--lsn", lsn, "--out", at_lsn),
                           ("replay", bus, "--epoch", 1, "--out", at_epoch),
                           ("replay", bus, "--time", format_time(ts), "--out", at_time))
    assert doc["state_lsn"] == lsn and doc["bytes"] == at_lsn.stat().st_size
    assert _same_pages(_load(at_lsn), mmsb.replay_to_lsn(lib, lsn))
    assert _same_pages(_load(at_epoch), mmsb.replay_to_epoch(lib, 1))
    assert _same_pages(_load(at_time), mmsb.replay_to_timestamp(lib, ts))

    # An existing file needs --force; the bus directory is never written.
    mmsb_cmd("replay", bus, "--lsn", 1, "--out", at_time, check=2)
    r = mmsb_cmd("replay", bus, "--lsn", 1, "--out", at_time, "--force")
    assert r.stdout.startswith(f"wrote {at_time}")
    assert _load(at_time).last_lsn == 1
    mmsb_cmd("replay", bus, "--lsn", 1, "--out", bus / "inside.mmsb", check=2)
    assert not (bus / "inside.mmsb").exists()


def test_verify_ok(bus: Path, lib: mmsb.MMSBState, crafted: Path) -> None:
    on_bus, doc = mmsb_jsons(("verify", bus), ("verify", crafted))
    assert on_bus["ok"] and on_bus["kind"] == "bus" and on_bus["last_lsn"] == lib.last_lsn
    assert doc["ok"] and doc["consistent"] and doc["records"] == 11
    assert "OK:" in mmsb_cmd("verify", bus).stdout


def test_verify_reports_a_state_that_differs_from_its_log(tmp_path: Path) -> None:
    s = _crafted_state()
    s.page_view(1)[5] = 0x7F  # bytes changed behind the log's back
    bad = tmp_path / "bad.mmsb"
    mmsb.checkpoint_log(s, bad)
    r = mmsb_cmd("verify", bad, check=1)
    assert "MISMATCH" in r.stdout and "page 1: bytes differ from offset 5" in r.stdout
    doc = json.loads(mmsb_cmd("verify", bad, "--json", check=1).stdout)
    assert doc["ok"] is False and doc["differences"] == ["page 1: bytes differ from offset 5"]


def test_verify_finds_a_damaged_checkpoint_file(bus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bus"
    shutil.copytree(bus, copy)
    oldest = sorted((copy / "checkpoints").glob("ckpt-*.mmsb"))[0]  # not needed by recovery
    raw = bytearray(oldest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    oldest.write_bytes(bytes(raw))
    r = mmsb_cmd("verify", copy, check=1)
    assert "DAMAGED" in r.stdout and oldest.name in r.stdout
    doc = mmsb_json("inspect", copy)
    assert doc["bus"]["checkpoints"][0]["status"] == "damaged"


def test_torn_tail_is_noted_not_failed(bus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bus"
    shutil.copytree(bus, copy)
    seg = sorted((copy / "wal").iterdir())[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00")  # a frame cut inside its length field
    doc = mmsb_json("inspect", copy)
    assert doc["bus"]["wal"][-1]["status"].startswith("torn tail")
    assert doc["notes"]
    r = mmsb_cmd("verify", copy)
    assert "OK:" in r.stdout and "note:" in r.stdout
    assert seg.read_bytes().endswith(b"\x40\x00\x00")


def test_stats_json_matches_library(bus: Path, lib: mmsb.MMSBState) -> None:
    doc = mmsb_json("stats", bus)
    want = mmsb.get_stats(lib)
    for name in ("total_pages", "cpu_pages", "total_page_bytes", "total_deltas",
                 "total_delta_bytes", "graph_edges", "graph_max_depth", "log_records",
                 "last_lsn", "arena_bytes_in_use"):
        assert doc[name] == getattr(want, name), name
    assert "MMSB statistics" in mmsb_cmd("stats", bus).stdout


# -- metrics --------------------------------------------------------------------------------

def test_metrics_once(bus: Path, lib: mmsb.MMSBState) -> None:
    text = mmsb_cmd("metrics", bus, "--once").stdout
    assert "mmsb_up 1.0" in text
    assert 'mmsb_pages{location="cpu"} 3.0' in text
    assert f"mmsb_last_lsn {float(lib.last_lsn)}" in text
    assert f"mmsb_deltas {float(len(lib.tlog))}" in text
    assert "mmsb_bus_checkpoint_files" in text and "mmsb_bus_wal_bytes" in text
    # Activity of a read-only rebuild would only describe the rebuild: left out.
    assert "mmsb_operation_latency_seconds" not in text


def test_metrics_serves_and_follows_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    state = mmsb.mmsb_start(enable_gpu=False, path=path)
    try:
        mmsb.create_page(state, 8)
        mmsb.write_page(state, 1, 0, b"abc")
        state.bus.flush()  # type: ignore[union-attr]
        proc = subprocess.Popen([sys.executable, "-m", "mmsb", "metrics", str(path),
                                 "--port", "0"], stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            m = re.search(r"127\.0\.0\.1:(\d+)/metrics", line)
            assert m, line

            def last_lsn() -> float:
                body = urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics",
                                              timeout=10).read().decode()
                return float(re.search(r"^mmsb_last_lsn (\S+)$", body, re.M).group(1))  # type: ignore[union-attr]

            assert last_lsn() == state.last_lsn
            mmsb.write_page(state, 1, 3, b"defg")
            state.bus.flush()  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            while last_lsn() != state.last_lsn and time.monotonic() < deadline:
                time.sleep(0.05)
            assert last_lsn() == state.last_lsn
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
    finally:
        mmsb.mmsb_stop(state)


def test_metrics_without_prometheus_client_is_one_line(bus: Path, tmp_path: Path) -> None:
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path),
                                                              ENV.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "mmsb", "metrics", str(bus), "--once"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "mmsb: error: Prometheus metrics need the prometheus_client package, which is not "
        "installed; install the extra: pip install 'mmsb[metrics]'"]


# -- errors ---------------------------------------------------------------------------------

ERROR_CASES = [
    (["inspect", "{missing}"], "does not exist"),
    (["log", "{empty_dir}"], "not an MMSB bus"),
    (["inspect", "{fifo_bus}"], "BUS is not a regular file"),
    (["inspect", ""], "an empty path names nothing"),
    (["demo", "--path", ""], "an empty path names nothing"),
    (["replay", "{bus}", "--lsn", "1", "--out", ""], "an empty path names nothing"),
    (["stats", "{garbage}"], "cannot decode"),
    (["verify", "{truncated}"], "truncated"),
    (["history", "{bus}", "99"], "page 99 does not exist"),
    (["history", "{bus}", "x"], "is not a page id"),
    (["blame", "{bus}", "0"], "is not a page id"),
    (["blame", "{bus}", "1", "--range", "9:3"], "not inside page 1"),
    (["blame", "{bus}", "1", "--range", "0:999"], "not inside page 1"),
    (["blame", "{bus}", "1", "--range", "a-b"], "is not a byte range"),
    (["log", "{bus}", "--since", "last tuesday"], "neither ISO 8601"),
    (["log", "{bus}", "--page", "42"], "page 42 does not exist"),
    (["replay", "{bus}", "--out", "{out}"], "exactly one of --lsn, --epoch, --time"),
    (["replay", "{bus}", "--lsn", "1", "--epoch", "1", "--out", "{out}"], "exactly one of"),
    (["replay", "{bus}", "--lsn", "10000", "--out", "{out}"], "outside the log"),
    (["verify", "{slice}"], "one checkpoint of a bus"),
    (["replay", "{slice}", "--lsn", "3", "--out", "{out}"], "cannot replay"),
    (["metrics", "{bus}"], "--port"),
    (["no-such-command"], "No such command"),
]


@pytest.fixture(scope="module")
def error_runs(bus: Path, crafted: Path, tmp_path_factory: pytest.TempPathFactory,
               ) -> dict[str, tuple[subprocess.CompletedProcess[str], Path, Path]]:
    """Every error case, run at once, each in an empty working folder of its own; each
    gets its own --out path to check."""
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "empty").mkdir()
    (tmp / "fifo-bus").mkdir()
    os.mkfifo(tmp / "fifo-bus" / "BUS")  # never opened: it would block a reader
    (tmp / "garbage.mmsb").write_bytes(b"not a checkpoint at all, sorry")
    raw = crafted.read_bytes()
    (tmp / "truncated.mmsb").write_bytes(raw[: len(raw) - 40])
    # A bus stopped twice: its second checkpoint holds only the log since the first.
    two = tmp / "two-sessions"
    for k in range(2):
        with mmsb.mmsb_start(enable_gpu=False, path=two) as s:
            if k == 0:
                mmsb.create_page(s, 16)
            mmsb.write_page(s, 1, 3 * k, b"\x07" * 4)
    slice_file = sorted((two / "checkpoints").glob("ckpt-*.mmsb"))[-1]

    def run(k: int, argv: list[str]) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
        out = tmp / f"out{k}.mmsb"
        names = {"missing": tmp / "nope", "empty_dir": tmp / "empty", "fifo_bus": tmp / "fifo-bus",
                 "garbage": tmp / "garbage.mmsb", "truncated": tmp / "truncated.mmsb",
                 "bus": bus, "out": out, "slice": slice_file}
        # (In an empty folder of their own: a path refused as empty must not have made
        # anything in the working directory either.)
        cwd = tmp / f"cwd{k}"
        cwd.mkdir()
        return mmsb_cmd(*(a.format(**names) for a in argv), check=None, cwd=cwd), out, cwd

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {" ".join(argv): pool.submit(run, k, argv)
                   for k, (argv, _) in enumerate(ERROR_CASES)}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize(("argv", "needle"), ERROR_CASES, ids=[" ".join(a) for a, _ in ERROR_CASES])
def test_user_errors_are_one_line(argv: list[str], needle: str,
                                  error_runs: dict[str, Any]) -> None:
    r, out, cwd = error_runs[" ".join(argv)]
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mmsb: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert list(cwd.iterdir()) == []


# -- argument parsing (in process) -----------------------------------------------------------

def test_parse_time_forms() -> None:
    assert parse_time("1700000000123456789") == 1700000000123456789
    assert parse_time("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_time("1970-01-01T00:00:01.5") == 1_500_000_000
    assert parse_time("1970-01-01T01:00:00.000000007+01:00") == 7
    assert parse_time("1970-01-02") == 86_400 * 10**9
    ns = 1795813491614137988
    assert parse_time(format_time(ns) or "") == ns
    for bad in ("soon", "1970-01-01T00:00:00.1234567891Z", "-5", "1969-12-31T23:59:59Z"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_parse_range_forms() -> None:
    assert parse_range("3:9") == (3, 9)
    assert parse_range("3:") == (3, None)
    assert parse_range(":9") == (None, 9)
    for bad in ("3", "a:b", "1:2:3", "-1:4"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_a_checkpoint_dropped_while_it_is_read_is_not_called_damaged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint the writer removes while the inspector reads it may name page-store
    slots that are reused by then: what does not check out is reported as removed, not
    as damage. A file that is still there and does not check out is damaged."""
    from mmsb._storage import checkpoint as ckpt_mod
    from mmsb.cli.views import checkpoint_file_info

    root = tmp_path / "bus"
    s = mmsb.mmsb_start(path=str(root), config=mmsb.MMSBConfig(enable_gpu=False))
    pid = mmsb.create_page(s, 64).id
    mmsb.write_page(s, pid, 0, b"x")
    mmsb.mmsb_stop(s)
    path = bus_files(root)["checkpoints"][-1]
    real = ckpt_mod.read_checkpoint
    keep = path.read_bytes()

    def reused(p: Any, **kw: Any) -> Any:
        real(p, **kw)  # read whole, then found not to check out
        if remove:
            os.unlink(p)
        raise mmsb.SerializationError("page 1 does not match its checksum", path=p)

    monkeypatch.setattr(ckpt_mod, "read_checkpoint", reused)
    for remove in (True, False):
        info = checkpoint_file_info(path)
        if remove:
            assert info["status"].startswith("removed while reading"), info
            path.write_bytes(keep)
        else:
            assert info["status"] == "damaged" and "checksum" in info["error"], info
