"""Monitoring: MMSBStats fields, real counts, printing, resetting."""

from __future__ import annotations

import dataclasses
import io

import pytest

import mmsb

FIELDS = [
    "total_pages", "cpu_pages", "gpu_pages", "unified_pages", "total_page_bytes",
    "total_deltas", "total_delta_bytes", "avg_delta_bytes", "graph_nodes", "graph_edges",
    "graph_max_depth", "delta_apply_count", "delta_apply_total_ns", "delta_apply_avg_ns",
    "propagation_count", "propagation_total_ns", "propagation_avg_ns",
]


def _busy(state):
    a = mmsb.create_page(state, 10)
    b = mmsb.create_page(state, 20)
    c = mmsb.create_page(state, 30)
    mmsb.add_dependency(state, a.id, b.id)
    mmsb.add_dependency(state, b.id, c.id)
    mmsb.register_passthrough_recompute(state, b.id, a.id, transform=lambda x: bytes(x) * 2)
    mmsb.update_page(state, a.id, b"0123456789")
    mmsb.write_page(state, c.id, 25, b"end")
    return a, b, c


def test_stats_fields_exist(state) -> None:
    stats = mmsb.get_stats(state)
    assert isinstance(stats, mmsb.MMSBStats)
    for f in FIELDS:
        assert hasattr(stats, f), f


def test_stats_is_frozen(state) -> None:
    stats = mmsb.get_stats(state)
    assert dataclasses.is_dataclass(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total_pages = 5  # type: ignore[misc]


def test_stats_empty_state(state) -> None:
    s = mmsb.get_stats(state)
    assert s.total_pages == 0 and s.total_page_bytes == 0
    assert s.total_deltas == 0 and s.total_delta_bytes == 0
    assert s.avg_delta_bytes == 0
    assert s.graph_edges == 0
    assert s.delta_apply_count == 0 and s.propagation_count == 0


def test_stats_reflect_real_counts(state) -> None:
    _busy(state)
    s = mmsb.get_stats(state)
    assert s.total_pages == 3
    assert s.cpu_pages == 3 and s.gpu_pages == 0 and s.unified_pages == 0
    assert s.total_page_bytes == 60
    assert s.total_deltas == len(state.tlog) == 3  # a, b (propagation), c
    assert s.total_delta_bytes > 0
    assert s.avg_delta_bytes == pytest.approx(s.total_delta_bytes / s.total_deltas)
    assert s.graph_edges == 2
    assert s.graph_nodes >= 3
    assert s.graph_max_depth in (2, 3)
    assert s.delta_apply_count >= 3
    assert s.delta_apply_total_ns > 0
    assert s.delta_apply_avg_ns == pytest.approx(s.delta_apply_total_ns / s.delta_apply_count, rel=0.01)
    assert s.propagation_count >= 1
    assert s.propagation_total_ns > 0
    mmsb.delete_page(state, 3)
    s2 = mmsb.get_stats(state)
    assert s2.total_pages == 2 and s2.total_page_bytes == 30
    assert s2.graph_edges == 1


def test_track_latency(state) -> None:
    mmsb.reset_stats(state)
    mmsb.track_delta_latency(state, 1000)
    mmsb.track_delta_latency(state, 3000)
    mmsb.track_propagation_latency(state, 500)
    s = mmsb.get_stats(state)
    assert s.delta_apply_count == 2
    assert s.delta_apply_total_ns == 4000
    assert s.delta_apply_avg_ns == pytest.approx(2000)
    assert s.propagation_count == 1
    assert s.propagation_total_ns == 500
    assert s.propagation_avg_ns == pytest.approx(500)


def test_print_stats(state) -> None:
    _busy(state)
    buf = io.StringIO()
    mmsb.print_stats(state, file=buf)
    out = buf.getvalue()
    assert out.strip()
    assert "total_pages" in out or "Pages" in out or "pages" in out
    assert "3" in out


def test_print_stats_refuses_what_cannot_be_written_to(state, capsys) -> None:
    for bad in (1, "out.txt", b"x", object()):
        with pytest.raises(mmsb.InvalidArgumentError, match="takes a text file"):
            mmsb.print_stats(state, file=bad)
        with pytest.raises(mmsb.InvalidArgumentError, match="takes a text file"):
            mmsb.get_stats(state).render(bad)  # type: ignore[arg-type]
    assert capsys.readouterr().out == ""


def test_print_stats_default_stdout(state, capsys) -> None:
    mmsb.create_page(state, 4)
    mmsb.print_stats(state)
    assert capsys.readouterr().out.strip()


def test_reset_stats_zeroes_counters_not_state(state) -> None:
    a, b, c = _busy(state)
    pages_before = {pid: mmsb.query_page(state, pid) for pid in state.pages}
    mmsb.reset_stats(state)
    s = mmsb.get_stats(state)
    assert s.delta_apply_count == 0 and s.delta_apply_total_ns == 0
    assert s.propagation_count == 0 and s.propagation_total_ns == 0
    assert s.delta_apply_avg_ns == 0 and s.propagation_avg_ns == 0
    assert s.total_pages == 3
    assert s.total_deltas == len(state.tlog) == 3
    assert {pid: mmsb.query_page(state, pid) for pid in state.pages} == pages_before
    mmsb.write_page(state, c.id, 0, b"x")
    assert mmsb.get_stats(state).delta_apply_count == 1
