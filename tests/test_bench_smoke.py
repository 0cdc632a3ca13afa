"""The benchmark suite in smoke mode: every case runs and reports sane numbers.

No timing is asserted anywhere: smoke sizes say nothing about speed. What is checked:
every registered case ran (or skipped for a stated reason that applies here), its
statistics are positive, the sanity checks inside the cases passed (a wrong byte makes a
case an error, and an error makes the command exit 1), every SPEC.md target has a row,
and the JSON round-trips through --compare and --save-baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mmsb.bench import (
    CATEGORIES,
    TARGETS,
    all_cases,
    check_targets,
    compare_results,
    load_results,
    merge_baseline,
    summarize,
)
from mmsb.bench.cases_replication import _redis_missing
from mmsb.bench.command import bench_command

CLEAN_ENV: dict[str, str | None] = {"MMSB_BENCH_CATEGORIES": None}


def _may_skip(key: str) -> bool:
    """Cases allowed to skip: GPU cases without CUDA, and replication cases on a machine
    without redis-server (redis-py is in the test extra; the server is not a Python
    package). LMDB is in the test extra, so its cases must run (a missing py-lmdb fails
    here instead of hiding the comparison)."""
    if key.startswith("replication/"):
        return _redis_missing() is not None
    return key.startswith("gpu/")


def _invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(bench_command, args, env=CLEAN_ENV, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    result = _invoke(["--smoke", "--check-targets", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads(out.read_text()), result.output


def test_smoke_runs_every_case(smoke: tuple[Path, dict[str, Any], str]) -> None:
    _, doc, _ = smoke
    assert doc["mode"] == "smoke"
    assert doc["categories"] == list(CATEGORIES)
    cases = doc["cases"]
    for c in all_cases():
        rec = cases.get(c.key)
        assert rec is not None, f"{c.key} missing from the results"
        assert rec["category"] == c.category
        if rec["status"] == "ok":
            for field in ("median_ns", "mean_ns", "min_ns", "max_ns"):
                assert rec[field] > 0, f"{c.key}: {field} = {rec[field]}"
            assert rec["min_ns"] <= rec["median_ns"] <= rec["max_ns"]
            assert rec["iqr_ns"] >= 0 and rec["stdev_ns"] >= 0
            assert rec["samples"] >= 1 and rec["ops_per_sample"] >= 1
        else:
            assert rec["status"] == "skipped", f"{c.key}: {rec['status']}: {rec.get('reason')}"
            assert rec.get("reason"), f"{c.key} skipped without a reason"
            assert _may_skip(c.key), f"{c.key} skipped here: {rec['reason']}"
    for category in CATEGORIES:
        ran = [r for r in cases.values() if r["category"] == category and r["status"] == "ok"]
        assert ran or _may_skip(f"{category}/"), f"no case of {category} ran"


def test_smoke_reports_environment_and_derived_numbers(
    smoke: tuple[Path, dict[str, Any], str],
) -> None:
    _, doc, _ = smoke
    env = doc["environment"]
    for field in ("python", "numpy", "platform", "cpu_model", "date", "git_commit"):
        assert field in env
    cases = doc["cases"]
    assert cases["replay/to_lsn_1mb_dense"]["metrics"]["gb_per_s"] > 0
    assert cases["replay/to_lsn_small_deltas"]["metrics"]["deltas_per_s"] > 0
    assert cases["batch/apply_batch_small"]["metrics"]["deltas_per_s"] > 0
    assert cases["memory/pages_1m_64b"]["metrics"]["rss_bytes_per_page"] > 0
    assert cases["peers/update_mmsb"]["metrics"]["storage_bytes"] > 0


def test_check_targets_gives_one_row_per_target(smoke: tuple[Path, dict[str, Any], str]) -> None:
    _, doc, output = smoke
    checks = check_targets(doc)
    assert [c.target.key for c in checks] == [t.key for t in TARGETS]
    for check in checks:
        assert check.status in ("met", "missed", "skipped", "error")
        if check.target.key.startswith("gpu") or (
                check.target.key.startswith("replication") and _may_skip("replication/")):
            continue
        assert check.status in ("met", "missed"), f"{check.target.key}: {check.note}"
        assert check.measured is not None and check.measured > 0
        assert check.met == (check.status == "met")
    assert [t["key"] for t in doc["targets"]] == [t.key for t in TARGETS]
    assert "SPEC.md performance targets" in output


def test_peer_ratios_are_reported(smoke: tuple[Path, dict[str, Any], str]) -> None:
    _, doc, _ = smoke
    rows = doc["peer_ratios"]
    update = {r["peer"]: r for r in rows if r["metric"] == "update"}
    assert update["mmsb"]["ratio"] == pytest.approx(1.0)
    for peer in ("sqlite", "naive", "numpy", "lmdb"):
        assert update[peer]["ratio"] is not None and update[peer]["ratio"] > 0


def test_compare_against_saved_file(smoke: tuple[Path, dict[str, Any], str]) -> None:
    path, doc, _ = smoke
    result = _invoke(
        ["--smoke", "--categories", "allocation,delta", "--no-peers", "--compare", str(path)]
    )
    assert result.exit_code == 0, result.output
    assert "Against baseline" in result.output
    assert any(word in result.output for word in ("faster", "slower", "similar"))

    rows = compare_results(doc, load_results(path))
    assert {r.verdict for r in rows} <= {"similar", "skipped"}
    assert any(r.verdict == "similar" for r in rows)


def test_save_baseline_to_out_and_merge(tmp_path: Path) -> None:
    target = tmp_path / "baseline.json"
    result = _invoke(
        [
            "--smoke",
            "--categories",
            "allocation",
            "--no-peers",
            "--save-baseline",
            "--out",
            str(target),
        ]
    )
    assert result.exit_code == 0, result.output
    first = load_results(target)
    assert first["categories"] == ["allocation"]
    result = _invoke(
        [
            "--smoke",
            "--categories",
            "propagation",
            "--save-baseline",
            "--out",
            str(target),
            "--no-peers",
        ]
    )
    assert result.exit_code == 0, result.output
    merged = load_results(target)
    assert merged["categories"] == ["allocation", "propagation"]
    assert "allocation/cpu_1kb" in merged["cases"] and "propagation/chain_10" in merged["cases"]


def test_categories_from_environment_and_unknown_category() -> None:
    result = CliRunner().invoke(
        bench_command, ["--list"], env={"MMSB_BENCH_CATEGORIES": "replay,stress"}
    )
    assert result.exit_code == 0, result.output
    assert "replay/epochs_100" in result.output and "delta/" not in result.output
    result = _invoke(["--categories", "allocation,warp", "--smoke"])
    assert result.exit_code == 2
    assert "warp" in result.output


def test_check_targets_statuses_without_running() -> None:
    doc = {
        "categories": ["delta"],
        "cases": {
            "delta/cpu_sparse_1kb": {"category": "delta", "status": "ok", "median_ns": 5_000.0},
            "delta/cpu_dense_1kb": {"category": "delta", "status": "ok", "median_ns": 20_000.0},
            "delta/cpu_dense_1mb": {"category": "delta", "status": "error", "reason": "boom"},
        },
    }
    by_key = {c.target.key: c for c in check_targets(doc)}
    assert by_key["delta_sparse_1kb"].status == "met"
    assert by_key["delta_dense_1kb"].status == "missed" and not by_key["delta_dense_1kb"].met
    assert by_key["delta_dense_1mb_vs_copy"].status == "error"
    assert by_key["propagation_chain_10"].status == "skipped"


def test_merge_baseline_keeps_other_categories_of_same_mode() -> None:
    old = {
        "mode": "full",
        "categories": ["delta", "replay"],
        "cases": {
            "delta/a": {"category": "delta", "median_ns": 1.0},
            "replay/b": {"category": "replay", "median_ns": 2.0},
        },
    }
    new = {
        "mode": "full",
        "categories": ["delta"],
        "cases": {
            "delta/c": {"category": "delta", "median_ns": 3.0},
        },
    }
    merged = merge_baseline(old, new)
    assert set(merged["cases"]) == {"delta/c", "replay/b"}
    assert merged["categories"] == ["delta", "replay"]
    assert merge_baseline({**old, "mode": "smoke"}, new)["cases"] == new["cases"]


def test_summarize_statistics() -> None:
    stats = summarize([4.0, 1.0, 3.0, 2.0, 100.0], 10)
    assert stats.median_ns == 3.0 and stats.min_ns == 1.0 and stats.max_ns == 100.0
    assert stats.iqr_ns == pytest.approx(2.0)
    assert stats.samples == 5 and stats.ops_per_sample == 10
    single = summarize([7.0], 1)
    assert single.stdev_ns == 0 and single.iqr_ns == 0


def test_missing_peer_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsb.bench import cases_peers, run_suite

    monkeypatch.setattr(cases_peers, "_lmdb_missing", lambda: "py-lmdb is not installed")
    doc = run_suite(["peers"], smoke=True)
    lmdb = {k: r for k, r in doc["cases"].items() if k.endswith("_lmdb")}
    assert lmdb and all(r["status"] == "skipped" for r in lmdb.values())
    assert {r["reason"] for r in lmdb.values()} == {"py-lmdb is not installed"}
    others = [r for k, r in doc["cases"].items() if k not in lmdb]
    assert others and all(r["status"] == "ok" for r in others)
    rows = [r for r in doc["peer_ratios"] if r["peer"] == "lmdb"]
    assert rows and all(r["value"] is None and r["note"] for r in rows)


def test_paired_measurements_rotate_the_order_each_round() -> None:
    from mmsb.bench._harness import HarnessSettings, measure_paired

    order: list[str] = []

    def batch_of(name: str) -> Any:
        def batch(_obj: Any, n: int) -> None:
            order.extend([name] * n)
        return batch

    settings = HarnessSettings(repeats=4, warmup=1, target_batch_ns=1, min_samples=1,
                               case_budget_ns=10**12)
    got = measure_paired([batch_of("a"), batch_of("b"), batch_of("c")], settings)
    assert [len(m.samples_ns) for m in got] == [4, 4, 4]
    assert "".join(order[3:]) == "abc" + "bca" + "cab" + "abc"
