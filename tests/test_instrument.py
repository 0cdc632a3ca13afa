"""The instrumentation manager: nothing installed when disabled, code units on pages
linked by COMPILER edges, the import hook, redefinition (reload, re-import, __code__
reassignment) bumping the world age and invalidating dependants, refusals that change
nothing."""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from typing import Any

import pytest

import mmsb
from conftest import assert_unchanged, snapshot
from instrument_helpers import PIPELINE, ModuleDir, make_modules, make_state
from mmsb._instrument.calls import hook_installed
from mmsb._instrument.manager import _FINDER, finder_installed, manager_of

modules_fixture = pytest.fixture(name="modules")(make_modules)
state_fixture = pytest.fixture(name="state")(make_state)


def sample(x: int) -> int:
    return x * 7


def other(x: int) -> int:
    return x - 1


def _events(st: mmsb.MMSBState, *types_: mmsb.EventType) -> list[tuple[str, tuple[Any, ...]]]:
    got: list[tuple[str, tuple[Any, ...]]] = []
    for et in types_:
        mmsb.subscribe(st, et, lambda s, e, *d: got.append((e.name, d)))
    return got


# -- enabling, disabling ------------------------------------------------------------------

def test_disabled_installs_nothing(state: mmsb.MMSBState) -> None:
    assert mmsb.instrumentation_config(state) is None
    assert state.recompute_hook is None
    assert _FINDER not in sys.meta_path
    assert sys.getprofile() is None and not hook_installed()
    assert manager_of(state) is None


def test_enable_then_disable_removes_every_hook(state: mmsb.MMSBState) -> None:
    cfg = mmsb.InstrumentationConfig(modules=("nothing_matches_*",), functions=(sample,),
                                     calls=True)
    assert mmsb.enable_instrumentation(state, cfg) == cfg
    assert finder_installed() and state.recompute_hook is not None
    assert hook_installed()
    assert mmsb.disable_instrumentation(state) is True
    assert not finder_installed() and state.recompute_hook is None
    assert not hook_installed() and sys.getprofile() is None
    assert mmsb.disable_instrumentation(state) is False
    # The pages it made stay, as history.
    assert len(state.pages) == 3


def test_mmsb_start_flag_enables_with_the_default_config() -> None:
    st = mmsb.mmsb_start(enable_instrumentation=True)
    try:
        assert mmsb.instrumentation_config(st) == mmsb.InstrumentationConfig()
        assert st.recompute_hook is not None
    finally:
        mmsb.mmsb_stop(st)
    assert manager_of(st) is None and st.recompute_hook is None
    st2 = mmsb.mmsb_start(config=mmsb.MMSBConfig(enable_instrumentation=True, enable_gpu=False))
    try:
        assert mmsb.instrumentation_config(st2) is not None
    finally:
        mmsb.mmsb_stop(st2)


@pytest.mark.parametrize("options", [
    {"modules": [3]}, {"modules": [""]}, {"functions": [3]}, {"calls": "yes"},
    {"capture": ("bytecode",)}, {"capture": ("ir", "ir")}, {"ring_capacity": 0},
    {"call_sample_every": True}, {"max_artefact_bytes": 1}, {"flush_every": -1},
])
def test_bad_configs_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(mmsb.InvalidArgumentError, match="InstrumentationConfig"):
        mmsb.InstrumentationConfig(**options)


def test_refused_calls_change_nothing(state: mmsb.MMSBState) -> None:
    mmsb.create_page(state, 8)
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidArgumentError, match="InstrumentationConfig"):
        mmsb.enable_instrumentation(state, {"modules": ["x"]})  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError, match="unknown instrumentation option"):
        mmsb.configure_instrumentation(state, colour="red")
    with pytest.raises(mmsb.InvalidArgumentError, match="enable_instrumentation"):
        mmsb.code_pages(state, sample)
    with pytest.raises(mmsb.InvalidArgumentError, match="enable_instrumentation"):
        mmsb.refresh_code(state)
    with pytest.raises(mmsb.InvalidArgumentError, match="check_code"):
        mmsb.verify_state_consistency(state, check_code="yes")  # type: ignore[arg-type]
    assert_unchanged(state, before)
    assert manager_of(state) is None and not finder_installed()


def test_enable_on_a_stopped_state_is_refused() -> None:
    st = mmsb.mmsb_start()
    mmsb.mmsb_stop(st)
    with pytest.raises(mmsb.StateClosedError):
        mmsb.enable_instrumentation(st)
    assert manager_of(st) is None


def test_configure_changes_options_and_keeps_units(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(sample,)))
    pages = mmsb.code_pages(state, sample)
    cfg = mmsb.configure_instrumentation(state, functions=(sample, other), provenance=False)
    assert cfg.provenance is False and state.recompute_hook is None
    assert mmsb.code_pages(state, sample) == pages
    assert set(mmsb.code_pages(state, other)) == {"source", "ast", "ir"}


# -- code units on pages ------------------------------------------------------------------

def test_function_artefacts_on_pages_with_compiler_edges(state: mmsb.MMSBState) -> None:
    got = _events(state, mmsb.EventType.COMPILE_START, mmsb.EventType.COMPILE_COMPLETE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(sample,)))
    pages = mmsb.code_pages(state, sample)
    assert set(pages) == {"source", "ast", "ir"}
    source = textwrap.dedent(inspect.getsource(sample))
    assert mmsb.query_page(state, pages["source"]).decode() == source
    tree = mmsb.deserialize_ast(mmsb.query_page(state, pages["ast"]))
    assert isinstance(tree.body[0], mmsb.deserialize_ast(mmsb.serialize_ast(tree)).body[0].__class__)
    ir = mmsb.deserialize_code_ir(mmsb.query_page(state, pages["ir"]))
    assert ir.code == sample.__code__.co_code and ir.qualname == "sample"
    assert mmsb.get_children(state, pages["source"]) == [(pages["ast"], mmsb.EdgeType.COMPILER)]
    assert mmsb.get_children(state, pages["ast"]) == [(pages["ir"], mmsb.EdgeType.COMPILER)]
    meta = state.pages[pages["ir"]].metadata["code_artefact"]
    assert meta["kind"] == "ir" and meta["name"].endswith(":sample") and meta["unit"] == "function"
    assert meta["hash"] == mmsb.code_hash(sample)
    assert got == [("COMPILE_START", (0, meta["name"])),
                   ("COMPILE_COMPLETE", (pages["ir"], meta["name"], mmsb.world_age(), False))]
    assert mmsb.verify_state_consistency(state)


def test_capture_subset_links_what_is_there(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(sample,),
                                                                   capture=("ir", "source")))
    pages = mmsb.code_pages(state, sample)
    assert set(pages) == {"source", "ir"}
    assert mmsb.get_children(state, pages["source"]) == [(pages["ir"], mmsb.EdgeType.COMPILER)]


def test_function_without_source_gets_its_ir_only(state: mmsb.MMSBState) -> None:
    namespace: dict[str, Any] = {}
    exec(compile("def made(x):\n    return x\n", "<generated>", "exec"), namespace)  # noqa: S102 - building a test function
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(namespace["made"],)))
    assert set(mmsb.code_pages(state, namespace["made"])) == {"ir"}


def test_import_hook_captures_matching_modules(state: mmsb.MMSBState, modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    got = _events(state, mmsb.EventType.COMPILE_COMPLETE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name[:-1] + "*",)))
    mod = modules.load(name)
    assert isinstance(mod.__spec__.loader, object)
    units = {d[1] for _e, d in got}
    assert units == {name, f"{name}:double", f"{name}:negate", f"{name}:Scaler.scale",
                     f"{name}:Scaler.offset"}
    mpages = mmsb.code_pages(state, mod)
    assert mmsb.query_page(state, mpages["source"]).decode() == textwrap.dedent(PIPELINE)
    mir = mmsb.deserialize_code_ir(mmsb.query_page(state, mpages["ir"]))
    assert {c.name for c in mir.walk()} >= {"<module>", "double", "negate", "Scaler", "scale"}
    assert set(mmsb.code_pages(state, mod.Scaler.offset)) == {"source", "ast", "ir"}
    assert mmsb.code_pages(state, f"{name}:double") == mmsb.code_pages(state, mod.double)
    # Modules not matching, and MMSB's own, are left alone.
    assert manager_of(state).wants_module("json") is False
    assert manager_of(state).wants_module("mmsb._api") is False


def test_modules_loaded_before_enabling_are_captured_at_once(state: mmsb.MMSBState,
                                                             modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mod = modules.load(name)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    assert set(mmsb.code_pages(state, mod.double)) == {"source", "ast", "ir"}


# -- redefinition ---------------------------------------------------------------------------

def _pipeline(state: mmsb.MMSBState, mod: Any) -> tuple[int, int, int]:
    src = mmsb.create_page(state, 4)
    dbl = mmsb.create_page(state, 4)
    neg = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, src.id, dbl.id)
    mmsb.add_dependency(state, dbl.id, neg.id)
    mmsb.register_recompute_fn(state, dbl.id, mod.double)
    mmsb.register_recompute_fn(state, neg.id, mod.negate)
    return src.id, dbl.id, neg.id


def test_reload_recaptures_changed_code_and_invalidates_dependants(
        state: mmsb.MMSBState, modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    src, dbl, neg = _pipeline(state, mod)
    dpages = mmsb.code_pages(state, mod.double)
    npages = mmsb.code_pages(state, mod.negate)
    # The recompute functions' IR pages now feed their pages through COMPILER edges.
    assert (dbl, mmsb.EdgeType.COMPILER) in mmsb.get_children(state, dpages["ir"])
    assert (neg, mmsb.EdgeType.COMPILER) in mmsb.get_children(state, npages["ir"])
    mmsb.update_page(state, src, b"\x01\x02\x03\x04")
    assert mmsb.query_page(state, dbl) == b"\x02\x04\x06\x08"
    age = mmsb.world_age()
    epochs = {k: state.pages[p].epoch for k, p in dpages.items()}
    neg_epochs = {k: state.pages[p].epoch for k, p in npages.items()}
    got = _events(state, mmsb.EventType.IR_INVALIDATED, mmsb.EventType.COMPILE_COMPLETE)
    lsn = state.last_lsn

    mod = modules.edit(mod, "(b * 2)", "(b * 3)")

    assert mmsb.world_age() == age + 1
    assert mmsb.code_pages(state, mod.double) == dpages  # same pages, new content
    for k, p in dpages.items():
        assert state.pages[p].epoch == epochs[k] + 1, k
    ir = mmsb.deserialize_code_ir(mmsb.query_page(state, dpages["ir"]))
    assert ir.code == mod.double.__code__.co_code
    assert b"b * 3" in mmsb.query_page(state, dpages["source"])
    # negate did not change: its pages were not touched.
    assert {k: state.pages[p].epoch for k, p in npages.items()} == neg_epochs
    # The recapture is logged deltas of the code pages.
    new = [d for d in mmsb.query_log(state) if d.lsn > lsn]
    assert {d.page_id for d in new if d.source == "instrument"} >= set(dpages.values())
    # The page computed by double was invalidated; negate's page was not.
    assert state.pages[dbl].metadata["ir_valid"] is False
    assert "ir_valid" not in state.pages[neg].metadata
    assert ("IR_INVALIDATED", (dbl, dpages["ir"])) in got
    assert ("COMPILE_COMPLETE", (dpages["ir"], f"{name}:double", age + 1, True)) in got
    assert ("COMPILE_COMPLETE", (npages["ir"], f"{name}:negate", age, False)) in got
    # The code pages themselves are valid again after the recapture.
    assert state.pages[dpages["ir"]].metadata.get("ir_valid", True) is True
    assert mmsb.verify_state_consistency(state)
    # Registering the new function and recomputing makes the page valid again.
    mmsb.register_recompute_fn(state, dbl, mod.double)
    mmsb.update_page(state, src, b"\x01\x01\x01\x01")
    assert mmsb.query_page(state, dbl) == b"\x03\x03\x03\x03"
    assert state.pages[dbl].metadata["ir_valid"] is True


def test_stale_flags_follow_compiler_edges_further(state: mmsb.MMSBState,
                                                   modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    ir = mmsb.code_pages(state, mod.negate)["ir"]
    kernel = mmsb.create_page(state, 4)
    binary = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, ir, kernel.id, mmsb.COMPILER_DEPENDENCY)
    mmsb.add_dependency(state, kernel.id, binary.id, mmsb.COMPILER_DEPENDENCY)
    got = _events(state, mmsb.EventType.IR_INVALIDATED)
    modules.edit(mod, "(256 - b)", "(255 - b)")
    assert ("IR_INVALIDATED", (kernel.id, ir)) in got
    assert ("IR_INVALIDATED", (binary.id, kernel.id)) in got
    assert state.pages[kernel.id].metadata["ir_valid"] is False
    assert state.pages[binary.id].metadata["ir_valid"] is False


def test_reimport_after_source_edit_is_picked_up(state: mmsb.MMSBState, modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    ir = mmsb.code_pages(state, mod.double)["ir"]
    epoch = state.pages[ir].epoch
    modules.write(name, PIPELINE.replace("(b * 2)", "(b + 2)"))
    del sys.modules[name]
    mod2 = importlib.import_module(name)
    assert mod2 is not mod
    assert mmsb.code_pages(state, mod2.double)["ir"] == ir
    assert state.pages[ir].epoch == epoch + 1


def test_moving_a_function_within_its_file_does_not_invalidate(state: mmsb.MMSBState,
                                                                modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    mod = modules.load(name)
    src, dbl, neg = _pipeline(state, mod)
    ir = mmsb.code_pages(state, mod.double)["ir"]
    epoch, age = state.pages[ir].epoch, mmsb.world_age()
    modules.edit(mod, "def double", "# a comment\n\n\ndef double")
    assert state.pages[ir].epoch == epoch and mmsb.world_age() == age
    assert "ir_valid" not in state.pages[dbl].metadata


def test_code_reassignment_is_found_by_refresh(state: mmsb.MMSBState) -> None:
    def target(x: int) -> int:
        return x + 1

    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(target,)))
    ir = mmsb.code_pages(state, target)["ir"]
    epoch, age = state.pages[ir].epoch, mmsb.world_age()
    assert mmsb.refresh_code(state) == []

    def replacement(x: int) -> int:
        return x + 100

    target.__code__ = replacement.__code__
    changed = mmsb.refresh_code(state)
    assert changed == [f"{__name__}:{target.__qualname__}"]
    assert mmsb.world_age() == age + 1
    assert state.pages[ir].epoch == epoch + 1
    assert mmsb.deserialize_code_ir(mmsb.query_page(state, ir)).consts == \
        mmsb.deserialize_code_ir(mmsb.serialize_code_ir(replacement)).consts


def test_capture_inside_a_batch_waits_for_refresh(state: mmsb.MMSBState, modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    page = mmsb.create_page(state, 4)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    with mmsb.batch(state):
        mmsb.write_page(state, page.id, 0, b"ab")
        mod = modules.load(name)
    mgr = manager_of(state)
    assert mgr is not None and mgr.deferred
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.code_pages(state, mod.double)
    mmsb.refresh_code(state)
    assert set(mmsb.code_pages(state, mod.double)) == {"source", "ast", "ir"}


def test_leaving_the_with_block_removes_every_hook() -> None:
    def f(x: int) -> int:
        return x

    with mmsb.mmsb_start(enable_instrumentation=True) as st:
        mmsb.configure_instrumentation(st, functions=(f,), calls=True, modules=("zz_*",))
        assert hook_installed() and finder_installed()
        f(1)
    assert not hook_installed() and not finder_installed() and manager_of(st) is None
    assert st.recompute_hook is None
    # Buffered calls were written before the state closed.
    assert len(mmsb.call_events(st)) == 1


def test_stopped_states_are_forgotten_by_the_import_hook(modules: ModuleDir) -> None:
    st = mmsb.mmsb_start()
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(st, mmsb.InstrumentationConfig(modules=(name,)))
    st.close()  # stopped without mmsb_stop: the hook must not write to it
    mod = modules.load(name)
    assert mod.double is not None
    mmsb.disable_instrumentation(st)
    assert not finder_installed()


def test_code_pages_survive_a_durable_reopen(tmp_path: Any) -> None:
    path = tmp_path / "bus"
    st = mmsb.mmsb_start(path=path)
    mmsb.enable_instrumentation(st, mmsb.InstrumentationConfig(functions=(sample,)))
    pages = mmsb.code_pages(st, sample)
    mmsb.mmsb_stop(st)
    st2 = mmsb.mmsb_start(path=path)
    try:
        ir = mmsb.deserialize_code_ir(mmsb.query_page(st2, pages["ir"]))
        assert ir.code == sample.__code__.co_code
        assert st2.pages[pages["ir"]].metadata["code_artefact"]["kind"] == "ir"
        assert mmsb.verify_state_consistency(st2)
    finally:
        mmsb.mmsb_stop(st2)


def test_a_syntax_tree_too_deep_is_left_out_not_fatal(state: mmsb.MMSBState) -> None:
    namespace: dict[str, Any] = {}
    body = " + ".join(["x"] * 400)
    src = f"def deep(x):\n    return {body}\n"
    exec(compile(src, "<deep>", "exec"), namespace)  # noqa: S102 - building a test function
    fn = namespace["deep"]
    import linecache

    linecache.cache["<deep>"] = (len(src), None, src.splitlines(True), "<deep>")
    try:
        mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=(fn,)))
    finally:
        linecache.cache.pop("<deep>", None)
    assert set(mmsb.code_pages(state, fn)) == {"source", "ir"}
    mgr = manager_of(state)
    assert mgr is not None and any("no syntax tree" in n for n in mgr.notes)


def test_a_lazy_import_inside_a_recompute_function_is_deferred(state: mmsb.MMSBState,
                                                                modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, PIPELINE)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(modules=(name,)))
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)

    def lazy(st: mmsb.MMSBState, page: mmsb.Page) -> bytes:
        mod = importlib.import_module(name)  # imported while the pass holds the state
        return bytes(mod.Scaler().scale(v) % 256 for v in bytes(st.pages[a.id].data))

    mmsb.register_recompute_fn(state, b.id, lazy)
    mmsb.update_page(state, a.id, b"\x01\x02\x03\x04")
    assert mmsb.query_page(state, b.id) == b"\x03\x06\x09\x0c"
    mod = sys.modules[name]
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.code_pages(state, mod.double)
    mmsb.refresh_code(state)
    assert set(mmsb.code_pages(state, mod.double)) == {"source", "ast", "ir"}
    assert mmsb.verify_state_consistency(state)
