"""Provenance: every propagated delta records the code that produced it, in the log (as
the page's produced_by metadata), through checkpoints, the durable bus and replay;
history and blame show it; verify_state_consistency(check_code=True) reports code that
changed since."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import mmsb
from instrument_helpers import PIPELINE, ModuleDir, make_modules, make_state
from mmsb.cli import main

modules_fixture = pytest.fixture(name="modules")(make_modules)
state_fixture = pytest.fixture(name="state")(make_state)


def bump(state: mmsb.MMSBState, page: mmsb.Page) -> bytes:
    return bytes((b + 1) % 256 for b in bytes(state.pages[page.id - 1].data))


def _chain(state: mmsb.MMSBState, fn: Any) -> tuple[int, int]:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)
    mmsb.register_recompute_fn(state, b.id, fn)
    return a.id, b.id


def test_disabled_records_nothing_extra(state: mmsb.MMSBState) -> None:
    a, b = _chain(state, bump)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")
    assert "produced_by" not in state.pages[b].metadata
    assert [type(r).__name__ for r in state.log.records][-2:] == ["Delta", "Delta"]
    d = mmsb.get_deltas_for_page(state, b)[-1]
    assert mmsb.produced_by(state, d) is None


def test_propagated_deltas_name_their_code(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    a, b = _chain(state, bump)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")
    d = mmsb.get_deltas_for_page(state, b)[-1]
    code = mmsb.produced_by(state, d)
    assert code == {"name": f"{__name__}:bump", "hash": mmsb.code_hash(bump)}
    assert mmsb.produced_by(state, mmsb.get_deltas_for_page(state, a)[-1]) is None
    # Recording it once is enough: more recomputations log no more metadata.
    n = len(state.log.records)
    for i in range(5):
        mmsb.update_page(state, a, bytes([i, i, i, i]))
    assert len(state.log.records) == n + 10
    assert mmsb.verify_state_consistency(state, check_code=True)


def test_instrumented_code_names_its_ir_page_and_epoch(state: mmsb.MMSBState,
                                                      modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    a, b = _chain(state, mod.double)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")
    ir = mmsb.code_pages(state, mod.double)["ir"]
    old = mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[-1])
    assert old == {"name": f"{name}:double", "hash": mmsb.code_hash(mod.double),
                   "ir_page": ir, "ir_epoch": state.pages[ir].epoch}
    # Change the code: deltas from then on name the new code, older ones the old.
    mod = modules.edit(mod, "(b * 2)", "(b * 5)")
    mmsb.register_recompute_fn(state, b, mod.double)
    mmsb.update_page(state, a, b"\x01\x01\x01\x01")
    new = mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[-1])
    assert new is not None and old is not None
    assert new["ir_page"] == ir and new["ir_epoch"] == state.pages[ir].epoch > old["ir_epoch"]
    assert new["hash"] != old["hash"]
    assert mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[0]) == old
    # The old delta came from code that is no longer registered.
    diffs = mmsb.code_differences(state)
    assert [(d.page_id, d.status, d.deltas) for d in diffs] == [(b, "changed", 1)]
    assert diffs[0].produced_by == old and diffs[0].current == new
    assert mmsb.verify_state_consistency(state) is True
    assert mmsb.verify_state_consistency(state, check_code=True) is False


def test_check_code_warns_with_what_changed(state: mmsb.MMSBState,
                                            caplog: pytest.LogCaptureFixture) -> None:
    mmsb.enable_instrumentation(state)
    a, b = _chain(state, bump)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")

    def bump2(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        return bytes(4)

    mmsb.register_recompute_fn(state, b, bump2)
    with caplog.at_level(logging.WARNING, logger="mmsb.instrument"):
        assert mmsb.verify_state_consistency(state, check_code=True) is False
    assert f"page {b}" in caplog.text and "bump2" in caplog.text


def test_code_reassignment_is_seen_at_the_next_recompute(state: mmsb.MMSBState) -> None:
    def fn(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        return b"aaaa"

    mmsb.enable_instrumentation(state)
    a, b = _chain(state, fn)
    mmsb.update_page(state, a, b"\x01\x00\x00\x00")
    first = mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[-1])

    def other(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        return b"bbbb"

    fn.__code__ = other.__code__
    mmsb.update_page(state, a, b"\x02\x00\x00\x00")
    second = mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[-1])
    assert first is not None and second is not None and first["hash"] != second["hash"]
    assert mmsb.query_page(state, b) == b"bbbb"


def test_passthroughs_and_callables(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    a = mmsb.create_page(state, 4)
    copy = mmsb.create_page(state, 4)
    upper = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, copy.id)
    mmsb.add_dependency(state, a.id, upper.id)
    mmsb.register_passthrough_recompute(state, copy.id, a.id)
    mmsb.register_passthrough_recompute(state, upper.id, a.id, bytes.upper)
    mmsb.update_page(state, a, b"abcd")
    assert mmsb.produced_by(state, mmsb.get_deltas_for_page(state, copy.id)[-1]) == {
        "name": "passthrough", "hash": "", "source_page": a.id}
    up = mmsb.produced_by(state, mmsb.get_deltas_for_page(state, upper.id)[-1])
    assert up is not None and up["hash"] == "" and up["source_page"] == a.id
    assert "upper" in up["name"]


def test_user_metadata_is_kept_and_restored_records(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    a, b = _chain(state, bump)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")
    mmsb.update_metadata(state, b, {"owner": "me"}, replace=True)  # drops produced_by
    mmsb.update_page(state, a, b"\x05\x02\x03\x04")
    meta = state.pages[b].metadata
    assert meta["owner"] == "me" and meta["produced_by"]["hash"] == mmsb.code_hash(bump)
    for d in mmsb.get_deltas_for_page(state, b):
        assert mmsb.produced_by(state, d) is not None


def test_provenance_survives_checkpoints_replay_and_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    st = mmsb.mmsb_start(path=path, enable_instrumentation=True)
    a, b = _chain(st, bump)
    mmsb.update_page(st, a, b"\x01\x02\x03\x04")
    d = mmsb.get_deltas_for_page(st, b)[-1]
    code = mmsb.produced_by(st, d)
    past = mmsb.replay_to_lsn(st, d.lsn)
    assert past.pages[b].metadata["produced_by"] == code
    ckpt = tmp_path / "one.mmsb"
    mmsb.checkpoint_log(st, ckpt)
    mmsb.mmsb_stop(st)
    again = mmsb.mmsb_start(path=path)
    try:
        d2 = mmsb.get_deltas_for_page(again, b)[-1]
        assert mmsb.produced_by(again, d2) == code
        # Nothing registered now: the code cannot be compared, which is no failure.
        diffs = mmsb.code_differences(again)
        assert [x.status for x in diffs] == ["unknown"]
        assert mmsb.verify_state_consistency(again, check_code=True)
        mmsb.register_recompute_fn(again, b, bump)
        assert mmsb.code_differences(again) == []
    finally:
        mmsb.mmsb_stop(again)
    loaded = mmsb.load_checkpoint(mmsb.MMSBState(), ckpt)
    assert mmsb.produced_by(loaded, mmsb.get_deltas_for_page(loaded, b)[-1]) == code


def test_offline_check_compares_with_the_ir_page(state: mmsb.MMSBState,
                                                 modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    a, b = _chain(state, mod.double)
    mmsb.update_page(state, a, b"\x01\x02\x03\x04")
    state.recompute_fns.clear()  # as after a reopen: only the pages say what the code is
    assert mmsb.code_differences(state) == []
    modules.edit(mod, "(b * 2)", "(b * 4)")
    diffs = mmsb.code_differences(state)
    assert [d.status for d in diffs] == ["changed"]
    assert "IR page" in diffs[0].reason


def test_compression_keeps_the_current_record(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    a, b = _chain(state, bump)
    for i in range(3):
        mmsb.update_page(state, a, bytes([i] * 4))
    mmsb.compress_log(state)
    assert state.pages[b].metadata["produced_by"]["hash"] == mmsb.code_hash(bump)
    mmsb.update_page(state, a, b"\x09\x09\x09\x09")
    assert mmsb.produced_by(state, mmsb.get_deltas_for_page(state, b)[-1]) is not None
    assert mmsb.verify_state_consistency(state)


def test_cli_history_and_blame_show_the_code(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    st = mmsb.mmsb_start(path=path, enable_instrumentation=True)
    a, b = _chain(st, bump)
    mmsb.update_page(st, a, b"\x01\x02\x03\x04")
    mmsb.mmsb_stop(st)
    runner = CliRunner()
    out = runner.invoke(main, ["history", str(path), str(b), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["deltas"]
    assert rows[-1]["code"]["hash"] == mmsb.code_hash(bump)
    out = runner.invoke(main, ["blame", str(path), str(b), "--json"])
    assert out.exit_code == 0, out.output
    ranges = json.loads(out.output)["ranges"]
    assert all(r["code"]["name"].endswith(":bump") for r in ranges if r["status"] == "delta")
    text = runner.invoke(main, ["history", str(path), str(b)], env={"COLUMNS": "200"}).output
    assert "bump #" + mmsb.code_hash(bump)[:6] in text
    text = runner.invoke(main, ["blame", str(path), str(b)], env={"COLUMNS": "200"}).output
    assert "bump #" in text
    plain = runner.invoke(main, ["history", str(path), str(a)], env={"COLUMNS": "200"}).output
    assert "code" not in plain.splitlines()[1]


def test_cli_verify_check_code(tmp_path: Path, modules: ModuleDir) -> None:
    path = tmp_path / "bus"
    name = modules.name()
    modules.write(name, PIPELINE)
    st = mmsb.mmsb_start(path=path)
    mmsb.enable_instrumentation(st, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    a, b = _chain(st, mod.double)
    mmsb.update_page(st, a, b"\x01\x02\x03\x04")
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(path), "--check-code"])
    assert ok.exit_code == 0, ok.output
    modules.edit(mod, "(b * 2)", "(b * 7)")  # the IR page now holds other code
    mmsb.mmsb_stop(st)
    bad = runner.invoke(main, ["verify", str(path), "--check-code"], env={"COLUMNS": "200"})
    assert bad.exit_code == 1 and "CODE CHANGED" in bad.output
    doc = runner.invoke(main, ["verify", str(path), "--check-code", "--json"])
    assert json.loads(doc.output)["code_changed"][0]["page"] == b
    assert runner.invoke(main, ["verify", str(path)]).exit_code == 0
