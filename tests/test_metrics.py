"""Prometheus exposition (mmsb.metrics): names, types and values against get_stats, the
optional-dependency error, the bus files collector and the HTTP endpoint."""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry  # in the test extra: never skipped

import mmsb
from mmsb.metrics import (
    BusFilesCollector,
    MMSBCollector,
    render_metrics,
    require_prometheus_client,
    serve_metrics,
)


def _busy_state() -> mmsb.MMSBState:
    """Pages, an edge with propagation, writes, a checkpoint and a failing handler."""
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.create_pages(s, 3, 64)
    mmsb.add_dependency(s, 1, 2)
    mmsb.register_passthrough_recompute(s, 2, 1)

    def broken(*_args: Any) -> None:
        raise RuntimeError("handler failure, on purpose")

    mmsb.subscribe(s, mmsb.EventType.PAGE_CHANGED, broken, filter=3)
    for k in range(5):
        mmsb.write_page(s, 1, k, bytes([k + 1]))
    mmsb.write_page(s, 3, 0, b"\xff" * 8)
    return s


def _registry(collector: Any) -> Any:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def test_collector_values_match_get_stats(tmp_path: Path) -> None:
    s = _busy_state()
    mmsb.checkpoint_log(s, tmp_path / "c.mmsb")
    st = mmsb.get_stats(s)
    reg = _registry(MMSBCollector(s))
    v = reg.get_sample_value
    assert v("mmsb_up") == 1
    assert v("mmsb_pages", {"location": "cpu"}) == 3
    assert v("mmsb_pages", {"location": "gpu"}) == 0
    assert v("mmsb_page_bytes") == 192
    assert v("mmsb_deltas") == st.total_deltas == len(s.tlog)
    assert v("mmsb_delta_bytes") == st.total_delta_bytes
    assert v("mmsb_log_records") == st.log_records
    assert v("mmsb_last_lsn") == s.last_lsn
    assert v("mmsb_graph_edges") == 1
    assert v("mmsb_arena_bytes", {"state": "in_use"}) == st.arena_bytes_in_use
    assert v("mmsb_arena_fragmentation_ratio") == pytest.approx(st.arena_fragmentation)
    assert v("mmsb_handler_errors_total") == st.handler_errors == 1
    assert v("mmsb_records_logged_total") == st.records_logged
    assert v("mmsb_payload_bytes_logged_total") == st.payload_bytes_logged > 0
    assert v("mmsb_events_emitted_total") == st.events_emitted
    assert v("mmsb_torn_tails_recovered_total") == 0
    assert v("mmsb_operations_total", {"operation": "delta_apply"}) == st.delta_apply_count
    assert v("mmsb_operations_total", {"operation": "checkpoint"}) == 1
    assert v("mmsb_operation_seconds_total", {"operation": "delta_apply"}) == pytest.approx(
        st.delta_apply_total_ns / 1e9)
    p50 = v("mmsb_operation_latency_seconds", {"operation": "delta_apply", "quantile": "0.5"})
    p99 = v("mmsb_operation_latency_seconds", {"operation": "delta_apply", "quantile": "0.99"})
    assert p50 == pytest.approx(st.delta_apply_p50_ns / 1e9) and 0 < p50 <= p99
    assert v("mmsb_operation_latency_max_seconds", {"operation": "propagation"}) == pytest.approx(
        st.propagation_max_ns / 1e9)


def test_exposition_names_and_types() -> None:
    text = render_metrics(_busy_state())
    for name, kind in [("mmsb_up", "gauge"), ("mmsb_pages", "gauge"),
                       ("mmsb_page_bytes", "gauge"), ("mmsb_deltas", "gauge"),
                       ("mmsb_log_records", "gauge"), ("mmsb_last_lsn", "gauge"),
                       ("mmsb_arena_bytes", "gauge"), ("mmsb_handler_errors", "counter"),
                       ("mmsb_torn_tails_recovered", "counter"), ("mmsb_operations", "counter"),
                       ("mmsb_payload_bytes_logged", "counter"),
                       ("mmsb_operation_latency_seconds", "gauge")]:
        # Counter families print their TYPE line with or without _total by version.
        assert re.search(rf"^# TYPE {name}(_total)? {kind}$", text, re.M), name
        sample = f"{name}_total" if kind == "counter" else name
        assert re.search(rf"^{sample}[{{ ]", text, re.M), sample
    assert 'mmsb_operation_latency_seconds{operation="log_append",quantile="0.99"}' in text


def test_activity_off_and_labels_and_namespace() -> None:
    s = _busy_state()
    reg = _registry(MMSBCollector(s, namespace="bus", const_labels={"bus": "orders"},
                                  activity=False))
    assert reg.get_sample_value("bus_pages", {"bus": "orders", "location": "cpu"}) == 3
    names = {m.name for m in reg.collect()}
    assert "bus_operation_latency_seconds" not in names
    assert "bus_handler_errors" not in names
    assert "bus_last_lsn" in names


def test_factory_is_called_per_scrape_and_failure_reports_down() -> None:
    states = [_busy_state()]
    calls = []

    def factory() -> mmsb.MMSBState:
        calls.append(1)
        if not states:
            raise mmsb.SerializationError("bus went away")
        return states[0]

    reg = _registry(MMSBCollector(factory))
    assert calls == []  # registering describes, it does not read the state
    assert reg.get_sample_value("mmsb_up") == 1
    states.clear()
    assert reg.get_sample_value("mmsb_up") == 0
    assert reg.get_sample_value("mmsb_pages", {"location": "cpu"}) is None


def test_bus_files_collector(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    with mmsb.mmsb_start(enable_gpu=False, path=path) as s:
        mmsb.create_page(s, 16)
        mmsb.write_page(s, 1, 0, b"x" * 16)
    files = {p.name: p.stat().st_size for p in (path / "checkpoints").glob("ckpt-*.mmsb")}
    store = (path / "checkpoints" / "pages").stat().st_size
    wal = {p.name: p.stat().st_size for p in (path / "wal").iterdir()}
    reg = _registry(BusFilesCollector(path))
    assert reg.get_sample_value("mmsb_bus_checkpoint_files") == len(files)
    assert reg.get_sample_value("mmsb_bus_checkpoint_bytes") == sum(files.values()) + store
    assert reg.get_sample_value("mmsb_bus_wal_segments") == len(wal)
    assert reg.get_sample_value("mmsb_bus_wal_bytes") == sum(wal.values())
    text = render_metrics(mmsb.open_readonly(path), bus_path=path, activity=False)
    assert "mmsb_bus_wal_bytes" in text and "mmsb_pages" in text


def test_serve_metrics_http() -> None:
    s = _busy_state()
    with serve_metrics(s, 0) as server:
        assert server.port > 0 and server.host == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                      timeout=10).read().decode()
        assert f"mmsb_last_lsn {float(s.last_lsn)}" in body
        mmsb.write_page(s, 1, 10, b"\x42")
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                      timeout=10).read().decode()
        assert f"mmsb_last_lsn {float(s.last_lsn)}" in body


def test_serve_metrics_refuses_a_busy_port() -> None:
    s = _busy_state()
    with serve_metrics(s, 0) as server:
        with pytest.raises(mmsb.MMSBError, match="cannot serve metrics"):
            serve_metrics(s, server.port)


def test_bad_arguments() -> None:
    with pytest.raises(mmsb.InvalidArgumentError):
        MMSBCollector(42)
    with pytest.raises(mmsb.InvalidArgumentError):
        MMSBCollector(_busy_state(), namespace="bad name")
    with pytest.raises(mmsb.InvalidArgumentError):
        serve_metrics(_busy_state(), -1)


def test_missing_prometheus_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails
    with pytest.raises(mmsb.MMSBError, match=r"pip install 'mmsb\[metrics\]'"):
        require_prometheus_client()
    with pytest.raises(mmsb.MMSBError, match="prometheus_client"):
        render_metrics(_busy_state())
    collector = MMSBCollector(_busy_state())  # building one needs nothing yet
    with pytest.raises(mmsb.MMSBError, match="prometheus_client"):
        list(collector.collect())
