"""MMSBSaver, MMSB as a LangGraph checkpointer.

* LangGraph's own conformance suite (``langgraph-checkpoint-conformance``) passes with
  every capability, base and extended, in memory and durable.
* A real ``StateGraph`` agent (deterministic nodes) gives the same states, history,
  time travel and fork as with ``SqliteSaver``; it resumes after its process is killed
  with SIGKILL, without rerunning a task whose writes were saved.
* Every multi-page operation (put, copy, delete, prune, delete by run) is all or nothing
  across a real kill at every file step.
* Refused calls change nothing; history grows with the changed bytes, not the values;
  concurrent threads; the byte-level extras (diff, history, blame, locate).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph.checkpoint.conformance")
pytest.importorskip("langgraph.checkpoint.sqlite")
pytest.importorskip("langgraph.graph")

from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.checkpoint.conformance import checkpointer_test, validate  # noqa: E402
from langgraph.checkpoint.conformance.capabilities import Capability  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402

import lg_graph  # noqa: E402
import mmsb  # noqa: E402
from conftest import run_workers  # noqa: E402
from mmsb._storage import fsops  # noqa: E402
from mmsb.integrations.langgraph import MMSBSaver  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRAPH_SCRIPT = Path(__file__).with_name("lg_graph.py")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def cfg(thread: str, ns: str = "", cid: str | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if cid is not None:
        conf["checkpoint_id"] = cid
    return {"configurable": conf}


def make_checkpoint(cid: str, values: dict[str, Any],
                    versions: dict[str, Any]) -> dict[str, Any]:
    cp = empty_checkpoint()
    cp["id"] = cid
    cp["ts"] = "2026-01-01T00:00:00+00:00"
    cp["channel_values"] = dict(values)
    cp["channel_versions"] = dict(versions)
    return cp


def view(saver: MMSBSaver, config: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Everything ``list`` shows, as comparable values."""
    return [(t.config["configurable"]["thread_id"], t.config["configurable"]["checkpoint_ns"],
             t.config["configurable"]["checkpoint_id"], t.checkpoint, t.metadata,
             None if t.parent_config is None else t.parent_config["configurable"]["checkpoint_id"],
             t.pending_writes)
            for t in saver.list(config)]


def message(i: int) -> Any:
    cls = HumanMessage if i % 2 == 0 else AIMessage
    return cls(content=f"message {i} " + "word " * 30, id=f"m-{i}")


def put_step(saver: MMSBSaver, thread: str, i: int, *, ns: str = "",
             parent: str | None = None, run: str = "run-1") -> str:
    """Checkpoint ``i`` of ``thread``: ``i + 1`` messages (one call of ``put``)."""
    cid = f"{i:08d}-{thread}-{ns}"
    msgs = [message(k) for k in range(i + 1)]
    cp = make_checkpoint(cid, {"messages": msgs, "count": i}, {"messages": i + 1,
                                                              "count": i + 1})
    saver.put(cfg(thread, ns, parent), cp,
              {"source": "loop", "step": i, "parents": {}, "run_id": run},
              {"messages": i + 1, "count": i + 1})
    return cid


def grow(saver: MMSBSaver, thread: str, n: int, *, ns: str = "", start: int = 0,
         parent: str | None = None, run: str = "run-1") -> list[str]:
    """``n`` checkpoints on ``thread``, each adding a message and a pending write."""
    ids = []
    for i in range(start, start + n):
        cid = put_step(saver, thread, i, ns=ns, parent=parent, run=run)
        saver.put_writes(cfg(thread, ns, cid), [("messages", [message(i + 1)]), ("count", i)],
                         f"task-{i}")
        parent = cid
        ids.append(cid)
    return ids


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_the_conformance_suite_passes_every_capability(durable: bool, tmp_path: Path) -> None:
    counter = itertools.count()

    @checkpointer_test(name=f"MMSBSaver-{'durable' if durable else 'memory'}")
    async def factory() -> Any:
        with MMSBSaver(tmp_path / f"bus-{next(counter)}" if durable else None) as saver:
            yield saver

    report = asyncio.run(validate(factory))
    assert set(report.results) == {c.value for c in Capability}
    for name, result in report.results.items():
        assert result.detected, f"{name} not detected"
        assert result.passed, f"{name}: {result.failures}"
        assert result.tests_failed == 0 and result.tests_passed > 0


def test_importing_mmsb_does_not_import_langgraph() -> None:
    code = ("import sys, mmsb, mmsb.integrations; "
            "print(sorted(m for m in ('langgraph', 'langchain_core') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_langgraph_the_module_names_the_extra() -> None:
    code = ("import sys\n"
            "sys.modules['langgraph'] = None\n"
            "import mmsb\n"
            "try:\n"
            "    import mmsb.integrations.langgraph\n"
            "except mmsb.MissingDependencyError as e:\n"
            "    assert isinstance(e, ImportError)\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mmsb[langgraph]" in proc.stdout


# --------------------------------------------------------------------------- a real graph


def _history(graph: Any, config: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(s.values, s.next, s.metadata.get("step"), s.metadata.get("source"),
             tuple((t.name, t.error) for t in s.tasks))
            for s in graph.get_state_history(config)]


def _run_story(saver: Any) -> dict[str, Any]:
    """Run the agent, travel back to step 4, fork there, replay from step 2."""
    graph = lg_graph.build().compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "story"}}
    out: dict[str, Any] = {"final": graph.invoke(lg_graph.first_input(), config, durability="sync")}
    first_id = graph.get_state(config).config["configurable"]["checkpoint_id"]
    out["history"] = _history(graph, config)
    past = next(s for s in graph.get_state_history(config) if s.metadata["step"] == 4)
    out["past"] = (past.values, past.next)
    again = graph.get_state(past.config)
    out["past_again"] = (again.values, again.next)
    forked = graph.update_state(past.config, {"notes": ["forked here"]})
    out["fork"] = graph.invoke(None, forked, durability="sync")
    out["fork_history"] = _history(graph, config)
    replay_from = next(s for s in graph.get_state_history(config) if s.metadata["step"] == 2)
    out["replay"] = graph.invoke(None, replay_from.config, durability="sync")
    out["after"] = _history(graph, config)
    out["first_branch"] = graph.get_state(
        {"configurable": {"thread_id": "story", "checkpoint_id": first_id}}).values
    return out


def test_a_real_graph_gives_the_same_states_as_sqlite(tmp_path: Path) -> None:
    conn = sqlite3.connect(str(tmp_path / "lg.sqlite"), check_same_thread=False)
    try:
        expected = _run_story(SqliteSaver(conn))
    finally:
        conn.close()
    assert expected["final"]["count"] == lg_graph.LIMIT
    assert expected["past"] == expected["past_again"]
    with MMSBSaver() as saver:
        assert _run_story(saver) == expected
    with MMSBSaver(tmp_path / "bus") as saver:
        assert _run_story(saver) == expected
    with MMSBSaver(tmp_path / "bus") as saver:  # reopened: the whole history is back
        graph = lg_graph.build().compile(checkpointer=saver)
        assert _history(graph, {"configurable": {"thread_id": "story"}}) == expected["after"]


def test_a_real_graph_runs_async(tmp_path: Path) -> None:
    async def story(saver: Any) -> tuple[Any, ...]:
        graph = lg_graph.build().compile(checkpointer=saver)
        config = {"configurable": {"thread_id": "async"}}
        final = await graph.ainvoke(lg_graph.first_input(), config, durability="sync")
        history = [(s.values, s.next) async for s in graph.aget_state_history(config)]
        return final, history

    conn = sqlite3.connect(str(tmp_path / "lg.sqlite"), check_same_thread=False)
    try:
        sync_graph = lg_graph.build().compile(checkpointer=SqliteSaver(conn))
        config = {"configurable": {"thread_id": "async"}}
        final = sync_graph.invoke(lg_graph.first_input(), config, durability="sync")
        expected = (final, [(s.values, s.next) for s in sync_graph.get_state_history(config)])
    finally:
        conn.close()
    async def both() -> None:
        async with MMSBSaver(tmp_path / "bus") as saver:
            assert await story(saver) == expected
    asyncio.run(both())


def test_a_killed_graph_resumes_where_it_stopped(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bus, trace, ready = tmp_path / "bus", tmp_path / "trace", tmp_path / "ready"
    trace.write_text("", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(GRAPH_SCRIPT), str(bus), "killed"],
                            env=_env(LG_TRACE=str(trace), LG_HANG_AT="3", LG_READY=str(ready)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the graph never reached the hanging node"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no clean-up, no final checkpoint
    proc.wait(timeout=60)
    ran_before = trace.read_text(encoding="utf-8").splitlines()
    assert "left 3" in ran_before and "right 3" not in ran_before

    monkeypatch.setenv("LG_TRACE", str(trace))
    config = {"configurable": {"thread_id": "killed"}}
    with MMSBSaver(bus) as saver:
        graph = lg_graph.build().compile(checkpointer=saver)
        state = graph.get_state(config)
        # left's writes were saved before the kill: only right is left to run
        assert state.values["count"] == 3 and state.next == ("right",)
        final = graph.invoke(None, config, durability="sync")
        history = _history(graph, config)
    ran = trace.read_text(encoding="utf-8").splitlines()
    assert ran.count("left 3") == 1, "a task whose writes were saved ran again"
    assert ran.count("right 3") == 1

    monkeypatch.delenv("LG_TRACE")
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    reference = lg_graph.build().compile(checkpointer=SqliteSaver(conn))
    assert final == reference.invoke(lg_graph.first_input(), config, durability="sync")
    expected = _history(reference, config)
    conn.close()
    # The same checkpoints, except that the resumed run's step re-entered with left's
    # saved write shows it as done.
    assert [h[:4] for h in history] == [h[:4] for h in expected]


# --------------------------------------------------------------------------- durability


def _template(path: Path) -> None:
    with MMSBSaver(path) as saver:
        grow(saver, "a", 3, ns="")
        grow(saver, "a", 2, ns="sub", run="run-2")
        grow(saver, "b", 2)
        grow(saver, "f", 1, run="run-2")
        saver.copy_thread("a", "copy")


OPS: dict[str, Any] = {
    "put_grow": lambda s: put_step(s, "a", 3, parent="00000002-a-"),
    "put_new_thread": lambda s: put_step(s, "d", 0),
    "put_on_copy": lambda s: put_step(s, "copy", 3, parent="00000002-a-"),
    "put_writes": lambda s: s.put_writes(cfg("b", cid="00000001-b-"),
                                         [("x", "y" * 5000), ("z", 1)], "late"),
    "copy_new": lambda s: s.copy_thread("a", "e"),
    "copy_existing": lambda s: s.copy_thread("a", "b"),
    "delete_thread": lambda s: s.delete_thread("a"),
    "prune": lambda s: s.prune(["a", "b"]),
    "delete_for_runs": lambda s: s.delete_for_runs(["run-2"]),
}


def _killed_during(root: Path, op: Any, n: int) -> bool:
    """Run ``op`` in a forked child that dies by ``os._exit`` at its ``n``-th file step;
    True if the op finished before that step."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            saver = MMSBSaver(root)
            seen = [0]

            def hook(step: str, path: str) -> None:
                seen[0] += 1
                if seen[0] >= n:
                    os._exit(137)

            fsops.set_fault_hook(hook)
            op(saver)
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (3, 137), status
    return os.WEXITSTATUS(status) == 3


def _check_pages(saver: MMSBSaver) -> None:
    """No page of the saver is left without a use: every journal page is indexed and
    every channel page belongs to a thread that exists or is referred to."""
    journals = {j.page_id for ts in saver._journals.values() for j in ts.values()}
    for pid, page in saver.state.pages.items():
        kind = page.metadata.get("mmsb.langgraph")
        if kind == "journal":
            assert pid in journals, f"journal page {pid} left behind"
        elif kind == "channel":
            meta = page.metadata
            alive = meta["ns"] in saver._journals.get(meta["thread"], {})
            assert alive or saver._refs.get(pid, 0) > 0, f"channel page {pid} left behind"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a real process")
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_operation_is_whole_or_absent_across_a_kill(tmp_path: Path, name: str) -> None:
    template = tmp_path / "template"
    _template(template)
    with MMSBSaver(template) as saver:
        before = view(saver)
    clean = tmp_path / "clean"
    shutil.copytree(template, clean)
    with MMSBSaver(clean) as saver:
        OPS[name](saver)
        after = view(saver)
    assert after != before
    outcomes = set()
    for n in range(1, 400):
        root = tmp_path / f"run-{n}"
        shutil.copytree(template, root)
        finished = _killed_during(root, OPS[name], n)
        with MMSBSaver(root) as saver:
            now = view(saver)
            _check_pages(saver)
        assert now in (before, after), f"{name}: a kill at file step {n} left a third state"
        outcomes.add(now == after)
        shutil.rmtree(root)
        if finished:
            break
    else:
        pytest.fail(f"{name} never finished")
    assert outcomes == {False, True}


def test_a_reopened_bus_shows_exactly_what_was_written(tmp_path: Path) -> None:
    bus = tmp_path / "bus"
    with MMSBSaver(bus) as saver:
        grow(saver, "a", 12)
        grow(saver, "a", 3, ns="child:1")
        grow(saver, 7, 2)  # type: ignore[arg-type]  # an int thread id is kept as a str
        saver.copy_thread("a", "b")
        grow(saver, "b", 2, start=12, parent="00000011-a-")
        saver.prune(["a"])
        saver.delete_for_runs(["nothing"])
        before = view(saver)
        lsn = saver.state.last_lsn
    with MMSBSaver(bus) as saver:
        assert view(saver) == before
        assert saver.state.last_lsn == lsn  # opening wrote nothing
        assert saver.get_tuple(cfg("7")) is not None


# --------------------------------------------------------------------------- contract details


def test_history_costs_the_changed_bytes_not_the_values() -> None:
    with MMSBSaver() as saver:
        grow(saver, "t", 200)
        ref = saver.locate(cfg("t"), "messages")
        deltas = mmsb.get_deltas_for_page(saver.state, ref.page_id)
        assert len(deltas) == 200
        logged = sum(d.count for d in deltas)
        in_full = sum(v.size for v in saver.history(cfg("t"), "messages"))
        # Each version is the whole growing list; the log holds about one message a step.
        assert logged < 3 * ref.length, (logged, ref.length)
        assert in_full > 40 * logged, (in_full, logged)


def test_versions_of_a_past_checkpoint_read_back_exactly() -> None:
    with MMSBSaver() as saver:
        ids = grow(saver, "t", 40)
        for i, cid in enumerate(ids):
            tup = saver.get_tuple(cfg("t", cid=cid))
            assert tup is not None
            assert tup.checkpoint["channel_values"]["messages"] == [message(k)
                                                                    for k in range(i + 1)]
            assert tup.checkpoint["channel_values"]["count"] == i
            assert tup.pending_writes == [(f"task-{i}", "messages", [message(i + 1)]),
                                          (f"task-{i}", "count", i)]
            assert tup.metadata["step"] == i
            assert (tup.parent_config is None) == (i == 0)


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_reads_equal_whole_page_reads_of_every_version(durable: bool, tmp_path: Path) -> None:
    # get_tuple and list read a value as its page's prefix at the value's epoch (from
    # the page itself when it is still there, else rebuilt from the history): held to
    # the whole page read with read_page_at and cut to the value's length, and to the
    # values put, for every checkpoint of a thread whose values grow, shrink (so later
    # versions of the page have bytes past a shorter value) and stay, in memory, on a
    # durable bus and after reopening it; list with metadata filters and limits gives
    # the same tuples as get_tuple.
    def notes(i: int) -> str:
        return ("n" * (300 - 7 * i) if i % 3 else "grown " * (i + 1)) + str(i)

    def check(saver: MMSBSaver, ids: list[str]) -> None:
        serde = saver.serde
        for i, cid in enumerate(ids):
            tup = saver.get_tuple(cfg("t", cid=cid))
            assert tup is not None
            values = tup.checkpoint["channel_values"]
            assert values == {"messages": [message(k) for k in range(i + 1)],
                              "notes": notes(i)}
            for channel, value in values.items():
                ref = saver.locate(cfg("t", cid=cid), channel)
                whole = mmsb.read_page_at(saver.state, ref.page_id, epoch=ref.epoch)
                assert serde.loads_typed((ref.type, whole[:ref.length])) == value
            listed = list(saver.list(cfg("t"), filter={"step": i}))
            assert listed == [tup]
        every = list(saver.list(cfg("t")))
        assert every == [saver.get_tuple(cfg("t", cid=cid)) for cid in reversed(ids)]
        odd = list(saver.list(cfg("t"), filter={"run_id": "odd"}, limit=5))
        assert [t.metadata["step"] for t in odd] == [39, 37, 35, 33, 31]

    path = tmp_path / "bus" if durable else None
    ids: list[str] = []
    with MMSBSaver(path) as saver:
        parent = None
        for i in range(40):
            cid = f"{i:08d}"
            cp = make_checkpoint(cid, {"messages": [message(k) for k in range(i + 1)],
                                       "notes": notes(i)}, {"messages": i + 1, "notes": i + 1})
            saver.put(cfg("t", cid=parent), cp,
                      {"source": "loop", "step": i, "parents": {},
                       "run_id": "odd" if i % 2 else "even"},
                      {"messages": i + 1, "notes": i + 1})
            saver.put_writes(cfg("t", cid=cid), [("messages", [message(i + 1)])], f"task-{i}")
            parent = cid
            ids.append(cid)
        check(saver, ids)
    if durable:
        with MMSBSaver(path) as saver:
            check(saver, ids)


def test_unchanged_channels_are_read_from_the_version_they_had() -> None:
    with MMSBSaver() as saver:
        c1 = saver.put(cfg("t"), make_checkpoint("1", {"a": "x" * 100, "b": [1, 2]},
                                                 {"a": 1, "b": 1}), {}, {"a": 1, "b": 1})
        c2 = saver.put(c1, make_checkpoint("2", {"a": "y" * 100, "b": [1, 2]},
                                           {"a": 2, "b": 1}), {}, {"a": 2})
        # a channel whose version collides with another branch's: the parent wins
        c3 = saver.put(c1, make_checkpoint("3", {"a": "z" * 50, "b": [1, 2]},
                                           {"a": 2, "b": 1}), {}, {"a": 2})
        c4 = saver.put(c2, make_checkpoint("4", {"a": "y" * 100, "b": [3]},
                                           {"a": 2, "b": 2}), {}, {"b": 2})
        values = {c["configurable"]["checkpoint_id"]:
                  saver.get_tuple(c).checkpoint["channel_values"]  # type: ignore[union-attr]
                  for c in (c1, c2, c3, c4)}
    assert values == {"1": {"a": "x" * 100, "b": [1, 2]}, "2": {"a": "y" * 100, "b": [1, 2]},
                      "3": {"a": "z" * 50, "b": [1, 2]}, "4": {"a": "y" * 100, "b": [3]}}


def test_special_writes_replace_and_ordinary_ones_are_kept() -> None:
    from langgraph.checkpoint.serde.types import ERROR, INTERRUPT

    with MMSBSaver() as saver:
        c = saver.put(cfg("t"), make_checkpoint("1", {}, {}), {}, {})
        saver.put_writes(c, [("x", 1), (ERROR, "first")], "task", "b")
        saver.put_writes(c, [("x", 2), (ERROR, "second"), (INTERRUPT, {"why": 1})], "task", "b")
        saver.put_writes(c, [("y", 3)], "other", "a")
        writes = saver.get_tuple(c).pending_writes  # type: ignore[union-attr]
    # writes_sort_key order: task path, then task id, then index
    assert writes == [("other", "y", 3), ("task", INTERRUPT, {"why": 1}),
                      ("task", ERROR, "second"), ("task", "x", 1)]


def test_list_filters_order_and_limits_across_threads() -> None:
    with MMSBSaver() as saver:
        grow(saver, "a", 4, run="r1")
        grow(saver, "b", 4, run="r2")
        grow(saver, "a", 2, ns="child", run="r1")
        every = [t[2] for t in view(saver)]
        assert every == sorted(every, reverse=True) and len(every) == 10
        assert len(view(saver, cfg("a"))) == 4  # checkpoint_ns "" is the root only
        assert len(list(saver.list({"configurable": {"thread_id": "a"}}))) == 6
        assert [t.metadata["run_id"] for t in saver.list(None, filter={"run_id": "r2"})] == ["r2"] * 4
        assert [t.metadata["step"] for t in saver.list(cfg("a"), filter={"step": 2})] == [2]
        before = saver.list(cfg("b"), before=cfg("b", cid="00000002-b-"), limit=1)
        assert [t.checkpoint["id"] for t in before] == ["00000001-b-"]
        assert list(saver.list(cfg("a"), limit=0)) == []
        assert [t.checkpoint["id"] for t in saver.list(cfg("a", cid="00000001-a-"))] == [
            "00000001-a-"]


def test_copy_shares_history_and_the_copy_forks_on_its_own_page() -> None:
    with MMSBSaver() as saver:
        grow(saver, "src", 30)
        pages = len(saver.state.pages)
        saver.copy_thread("src", "dst")
        assert len(saver.state.pages) == pages + 1  # only the journal is cloned
        assert view(saver, cfg("dst")) == [("dst",) + row[1:] for row in view(saver, cfg("src"))]
        grow(saver, "dst", 1, start=30, parent="00000029-src-")
        grow(saver, "src", 1, start=30, parent="00000029-src-")
        a, b = saver.locate(cfg("src"), "messages"), saver.locate(cfg("dst"), "messages")
        assert a.page_id != b.page_id
        first = mmsb.get_deltas_for_page(saver.state, b.page_id)
        assert len(first) == 1 and first[0].count < 1000  # a clone, then a small delta
        saver.delete_thread("src")  # the copy still reads the shared pages
        tup = saver.get_tuple(cfg("dst", cid="00000010-src-"))
        assert tup is not None and len(tup.checkpoint["channel_values"]["messages"]) == 11
        saver.delete_thread("dst")
        assert not any("mmsb.langgraph" in p.metadata for p in saver.state.pages.values())


def test_prune_keeps_the_latest_and_frees_what_nothing_uses() -> None:
    with MMSBSaver() as saver:
        grow(saver, "a", 10)
        grow(saver, "a", 3, ns="x")
        latest = saver.get_tuple(cfg("a"))
        saver.prune(["a"], strategy="keep_latest")
        assert [t[2] for t in view(saver, {"configurable": {"thread_id": "a"}})] == [
            "00000009-a-", "00000002-a-x"]
        assert saver.get_tuple(cfg("a")) == latest
        grow(saver, "a", 1, start=10, parent="00000009-a-")  # continues after pruning
        assert len(view(saver, cfg("a"))) == 2
        saver.prune(["a"], strategy="delete")
        assert view(saver) == []


# --------------------------------------------------------------------------- refusals


def _observed(saver: MMSBSaver) -> tuple[Any, ...]:
    return view(saver), saver.state.last_lsn, len(saver.state.pages)


@pytest.mark.parametrize("call", [
    lambda s: s.put({"configurable": {}}, make_checkpoint("9", {}, {}), {}, {}),
    lambda s: s.put("thread", make_checkpoint("9", {}, {}), {}, {}),
    lambda s: s.put(cfg("t", ns=5), make_checkpoint("9", {}, {}), {}, {}),  # type: ignore[arg-type]
    lambda s: s.put(cfg("t"), {"id": 9}, {}, {}),
    lambda s: s.put(cfg("t"), make_checkpoint("9", {"a": 1}, {"a": 1}), {}, {"a": None}),
    lambda s: s.put(cfg("t"), make_checkpoint("9", {"a": 1}, {"a": True}), {}, {"a": True}),
    lambda s: s.put(cfg("t"), make_checkpoint("9", {}, {}), "meta", {}),
    lambda s: s.put(cfg("t", cid=7), make_checkpoint("9", {}, {}), {}, {}),  # type: ignore[arg-type]
    lambda s: s.put_writes(cfg("t"), [("a", 1)], "task"),
    lambda s: s.put_writes(cfg("t", cid="1"), [("a",)], "task"),
    lambda s: s.put_writes(cfg("t", cid="1"), [(1, 2)], "task"),
    lambda s: s.put_writes(cfg("t", cid="1"), [("a", 1)], 5),
    lambda s: s.prune(["t"], strategy="keep_oldest"),
    lambda s: s.prune("t"),
    lambda s: s.delete_for_runs("run-1"),
    lambda s: s.copy_thread("t", "t"),
    lambda s: list(s.list(cfg("t"), limit="2")),
    lambda s: list(s.list(cfg("t"), filter=[("step", 1)])),
    lambda s: list(s.list(cfg("t"), before={"configurable": {"checkpoint_id": 3}})),
    lambda s: s.diff(cfg("t", cid="nope"), cfg("t")),
    lambda s: s.locate(cfg("t"), "nothing"),
    lambda s: s.history(cfg("nobody"), "messages"),
    lambda s: s.blame(cfg("t", cid="nope"), "messages"),
])
def test_a_refused_call_raises_a_typed_error_and_changes_nothing(call: Any,
                                                                 tmp_path: Path) -> None:
    with MMSBSaver(tmp_path / "bus") as saver:
        grow(saver, "t", 3)
        before = _observed(saver)
        with pytest.raises(mmsb.InvalidArgumentError):
            call(saver)
        assert _observed(saver) == before


def test_a_value_the_serializer_cannot_encode_changes_nothing() -> None:
    with MMSBSaver() as saver:
        grow(saver, "t", 2)
        before = _observed(saver)
        with pytest.raises(TypeError):
            saver.put(cfg("t"), make_checkpoint("9", {"a": object()}, {"a": 1}), {}, {"a": 1})
        with pytest.raises(TypeError):
            saver.put_writes(cfg("t", cid="00000001-t-"), [("a", object())], "task")
        assert _observed(saver) == before


@pytest.mark.parametrize("durable", [False, True])
def test_a_put_whose_record_is_refused_undoes_the_values_it_wrote(
        durable: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel writes and the record are one batch: a record refused after the
    values were written (here one over a lowered frame limit) takes them back."""
    from mmsb.integrations import _journal as jr

    with MMSBSaver(tmp_path / "bus" if durable else None) as saver:
        ids = grow(saver, "t", 3)
        state = saver.state

        def channels() -> dict[int, tuple[int, bytes, int]]:
            return {pid: (page.epoch, mmsb.query_page(state, pid),
                          len(mmsb.get_deltas_for_page(state, pid)))
                    for pid, page in state.pages.items()
                    if page.metadata.get("mmsb.langgraph") == "channel"}

        # (The journal may grow first, outside the batch: that shows nothing.)
        before = view(saver), channels()
        monkeypatch.setattr(jr, "MAX_FRAME", 16)
        cp = make_checkpoint("00000009-t-", {"messages": [message(7)], "count": 9},
                             {"messages": 10, "count": 10})
        with pytest.raises(mmsb.SerializationError, match="frame limit"):
            saver.put(cfg("t", cid=ids[-1]), cp, {"source": "loop", "step": 9},
                      {"messages": 10, "count": 10})
        assert (view(saver), channels()) == before
        monkeypatch.undo()
        saver.put(cfg("t", cid=ids[-1]), cp, {"source": "loop", "step": 9},
                  {"messages": 10, "count": 10})
        got = saver.get_tuple(cfg("t"))
        assert got is not None and got.checkpoint["channel_values"]["messages"] == [message(7)]


@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_durable_puts_take_the_staged_batch_and_write_what_the_general_path_writes(
        fsync: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A durable put's batch is staged and committed in one compiled call
    (_storage/fastbatch.py); the log's frames, the pages and the reads are those of the
    general path (the same puts with staging turned off, time stamps alike)."""
    from conftest import frames_end
    from mmsb._storage.wal import SEG_HEADER_SIZE

    def run(fast: bool) -> tuple[Any, ...]:
        now = [1_700_000_000_000_000_000]

        def tick() -> int:
            now[0] += 1000
            return now[0]

        monkeypatch.setattr(time, "time_ns", tick)
        commits = [0]
        with MMSBSaver(tmp_path / str(fast), config=mmsb.MMSBConfig(fsync=fsync)) as saver:
            bus = saver.state.bus
            assert bus is not None
            if fast:
                real = bus.commit_staged

                def counted(*args: Any) -> bool:
                    out = real(*args)
                    commits[0] += out
                    return out

                bus.commit_staged = counted  # type: ignore[method-assign]
            else:
                bus.stage_write = lambda *args: None  # type: ignore[method-assign]
            ids = grow(saver, "t", 12)
            bus.flush()
            frames = {p.name: p.read_bytes() for p in sorted(bus.wal_dir.iterdir())}
            pages = {pid: (page.epoch, mmsb.query_page(saver.state, pid))
                     for pid, page in saver.state.pages.items()}
            reads = [view(saver)] + [saver.get_tuple(cfg("t", cid=c)) for c in ids]
        monkeypatch.undo()
        return ({n: d[SEG_HEADER_SIZE:frames_end(d)] for n, d in frames.items()}, pages,
                reads, commits[0])

    (ff, fp, fr, commits), (gf, gp, gr, _) = run(True), run(False)
    assert ff == gf and fp == gp and fr == gr
    # (A small channel's new value may change more than a quarter of its page: a dense
    # write, which the general path takes, and the rest of its batch with it.)
    assert commits >= 8, "the puts did not take the staged batch"


@pytest.mark.parametrize("config", [
    mmsb.MMSBConfig(enable_logging=False),
    mmsb.MMSBConfig(retain_checkpoints=2),
    "fsync=always",
])
def test_a_config_that_would_lose_history_is_refused(config: Any, tmp_path: Path) -> None:
    with pytest.raises(mmsb.InvalidArgumentError):
        MMSBSaver(tmp_path / "bus", config=config)
    assert not (tmp_path / "bus").exists()


def test_config_is_used_and_memory_never_compresses(tmp_path: Path) -> None:
    with MMSBSaver(config=mmsb.MMSBConfig(max_tlog_size=5)) as saver:
        grow(saver, "t", 20)
        assert saver.get_tuple(cfg("t", cid="00000000-t-")) is not None
    with MMSBSaver(tmp_path / "bus", config=mmsb.MMSBConfig(fsync="always")) as saver:
        assert saver.state.config.fsync == "always"
        assert saver.path == str(tmp_path / "bus")


def test_a_damaged_journal_is_a_serialization_error(tmp_path: Path) -> None:
    bus = tmp_path / "bus"
    with MMSBSaver(bus) as saver:
        grow(saver, "t", 3)
        jid = saver._journals["t"][""].page_id
        mmsb.write_page(saver.state, jid, 20, b"\xff\xfe")  # inside the first record
    with pytest.raises(mmsb.SerializationError, match=f"journal page {jid}"):
        MMSBSaver(bus)
    # the failed open released the bus
    with mmsb.mmsb_start(path=bus, enable_gpu=False) as state:
        assert jid in state.pages


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    with MMSBSaver(tmp_path / "bus"), pytest.raises(mmsb.BusLockedError):
        MMSBSaver(tmp_path / "bus")


# --------------------------------------------------------------------------- concurrency


def test_threads_writing_and_reading_at_once() -> None:
    with MMSBSaver() as saver:
        def worker(k: int) -> None:
            thread = f"w{k}"
            ids = grow(saver, thread, 15)
            for cid in ids:
                assert saver.get_tuple(cfg(thread, cid=cid)) is not None
            for _ in saver.list(None, limit=5):
                pass
            if k % 2:
                saver.copy_thread(thread, f"c{k}")
                saver.prune([thread])

        run_workers(worker, [(k,) for k in range(6)])
        assert len(view(saver, cfg("w0"))) == 15
        assert len(view(saver, cfg("w1"))) == 1 and len(view(saver, cfg("c1"))) == 15


def test_listing_while_another_thread_prunes_skips_what_went() -> None:
    with MMSBSaver() as saver:
        grow(saver, "t", 20)
        seen = []
        for t in saver.list(cfg("t")):
            seen.append(t.checkpoint["id"])
            if len(seen) == 1:
                other = threading.Thread(target=saver.prune, args=(["t"],))
                other.start()
                other.join(timeout=60)
        assert seen == ["00000019-t-"]


# --------------------------------------------------------------------------- MMSB's view


def test_diff_history_and_blame_follow_the_steps() -> None:
    with MMSBSaver() as saver:
        ids = grow(saver, "t", 6)
        d = saver.diff(cfg("t", cid=ids[2]), cfg("t", cid=ids[4]))
        assert [c.channel for c in d] == ["count", "messages"]
        msgs = d[1]
        assert msgs.status == "changed" and msgs.old is not None and msgs.new is not None
        changed = {i for a, b in msgs.ranges for i in range(a, b)}
        truth = {i for i in range(max(len(msgs.old), len(msgs.new)))
                 if i >= min(len(msgs.old), len(msgs.new)) or msgs.old[i] != msgs.new[i]}
        assert changed == truth and msgs.changed_bytes == len(truth)
        assert saver.diff(cfg("t", cid=ids[3]), cfg("t", cid=ids[3])) == []

        hist = saver.history(cfg("t"), "messages")
        assert [h.checkpoint_id for h in hist] == ids
        assert [h.step for h in hist] == list(range(6))
        assert all(h.lsn is not None and h.timestamp is not None for h in hist)
        assert hist[0].changed_bytes == hist[0].size
        ref = saver.locate(cfg("t"), "messages")
        assert (hist[-1].page_id, hist[-1].epoch) == (ref.page_id, ref.epoch)
        value = mmsb.read_page_at(saver.state, ref.page_id, epoch=ref.epoch)[:ref.length]
        assert saver.serde.loads_typed((ref.type, value)) == [message(k) for k in range(6)]

        blame = saver.blame(cfg("t"), "messages")
        assert blame[0].start == 0 and blame[-1].stop == ref.length
        assert all(a.stop == b.start for a, b in itertools.pairwise(blame))
        # the last message's bytes are the last step's
        last = saver.diff(cfg("t", cid=ids[4]), cfg("t"))[1]
        tail = last.ranges[-1]
        owner = [b for b in blame if b.start <= tail[0] < b.stop][0]
        assert owner.checkpoint_id == ids[5] and owner.step == 5
        assert {b.checkpoint_id for b in blame} <= set(ids)


def test_mmsb_blame_and_history_read_a_channel_page_of_a_live_bus(tmp_path: Path) -> None:
    bus = tmp_path / "bus"
    with MMSBSaver(bus) as saver:
        grow(saver, "t", 5)
        ref = saver.locate(cfg("t"), "messages")
        for command in ("blame", "history"):
            proc = subprocess.run([sys.executable, "-m", "mmsb", command, str(bus),
                                   str(ref.page_id), "--json"], env=_env(),
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)


# --------------------------------------------------------------------------- more of LangGraph


def _subgraph_story(saver: Any) -> tuple[Any, ...]:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class Inner(TypedDict):
        text: str

    def shout(state: Inner) -> dict[str, Any]:
        return {"text": state["text"].upper()}

    inner = StateGraph(Inner)
    inner.add_node("shout", shout)
    inner.add_edge(START, "shout")
    inner.add_edge("shout", END)

    outer = StateGraph(Inner)
    outer.add_node("child", inner.compile())
    outer.add_node("exclaim", lambda s: {"text": s["text"] + "!"})
    outer.add_edge(START, "child")
    outer.add_edge("child", "exclaim")
    outer.add_edge("exclaim", END)
    graph = outer.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "sub"}}
    final = graph.invoke({"text": "hi"}, config, durability="sync")
    namespaces = sorted({t.config["configurable"]["checkpoint_ns"].split(":")[0]
                         for t in saver.list({"configurable": {"thread_id": "sub"}})})
    history = [(s.values, s.next) for s in graph.get_state_history(config)]
    return final, namespaces, history


def _interrupt_story(saver: Any) -> tuple[Any, ...]:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Command, interrupt

    class Ask(TypedDict):
        question: str
        answer: str

    def ask(state: Ask) -> dict[str, Any]:
        return {"answer": interrupt({"question": state["question"]})}

    b = StateGraph(Ask)
    b.add_node("ask", ask)
    b.add_edge(START, "ask")
    b.add_edge("ask", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "human"}}
    first = graph.invoke({"question": "why?", "answer": ""}, config, durability="sync")
    waiting = graph.get_state(config)
    interrupts = [i.value for t in waiting.tasks for i in t.interrupts]
    final = graph.invoke(Command(resume="because"), config, durability="sync")
    return first["__interrupt__"][0].value, waiting.next, interrupts, final


@pytest.mark.parametrize("story", [_subgraph_story, _interrupt_story],
                         ids=["subgraph", "interrupt"])
def test_subgraphs_and_interrupts_match_sqlite(story: Any, tmp_path: Path) -> None:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    expected = story(SqliteSaver(conn))
    conn.close()
    with MMSBSaver() as saver:
        assert story(saver) == expected
    with MMSBSaver(tmp_path / "bus") as saver:
        assert story(saver) == expected


def test_a_closed_saver_reads_and_refuses_writes(tmp_path: Path) -> None:
    saver = MMSBSaver(tmp_path / "bus")
    grow(saver, "t", 3)
    saver.close()
    saver.close()
    before = view(saver)
    assert len(before) == 3
    with pytest.raises(mmsb.StateClosedError):
        put_step(saver, "t", 3, parent="00000002-t-")
    with pytest.raises(mmsb.StateClosedError):
        saver.put_writes(cfg("t", cid="00000002-t-"), [("x", 1)], "late")
    assert view(saver) == before


# --------------------------------------------------------------------------- against a model


from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

THREADS = ("t1", "t2", "t3")
NAMESPACES = ("", "child:1")
CHANNELS = ("messages", "count", "flag")


class SaverMachine(RuleBasedStateMachine):
    """Random puts, writes, copies, prunes and deletions on an MMSBSaver (durable, with
    reopens), against a model of what LangGraph's contract says each call leaves."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="mmsb-lg-machine-")
        self.saver = MMSBSaver(os.path.join(self.dir, "bus"))
        # (thread, ns) -> cid -> [values, metadata, parent, {(task, idx): (task, ch, v, path)}]
        self.model: dict[tuple[str, str], dict[str, list[Any]]] = {}
        self.versions: dict[tuple[str, str], dict[str, int]] = {}
        self.values: dict[tuple[str, str], dict[str, Any]] = {}
        self.clock = itertools.count(1)

    def teardown(self) -> None:
        self.saver.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(thread=st.sampled_from(THREADS), ns=st.sampled_from(NAMESPACES),
          changes=st.dictionaries(st.sampled_from(CHANNELS),
                                  st.one_of(st.integers(0, 9),
                                            st.lists(st.text(max_size=30), max_size=12)),
                                  max_size=3),
          run=st.sampled_from(["r1", "r2"]), branch=st.booleans())
    def put(self, thread: str, ns: str, changes: dict[str, Any], run: str,
            branch: bool) -> None:
        key = (thread, ns)
        ours = self.model.setdefault(key, {})
        parent = max(ours) if ours else None
        if branch and len(ours) > 1:
            parent = sorted(ours)[0]  # a fork from an older checkpoint
        base = dict(ours[parent][0]) if parent is not None else {}
        versions = dict(self.versions.get((key, parent), {}))  # type: ignore[call-overload]
        new_versions = {}
        for ch, v in changes.items():
            base[ch] = v
            versions[ch] = new_versions[ch] = next(self.clock)
        cid = f"{next(self.clock):010d}"
        self.saver.put(cfg(thread, ns, parent), make_checkpoint(cid, base, versions),
                       {"source": "loop", "step": len(ours), "run_id": run}, new_versions)
        ours[cid] = [base, {"source": "loop", "step": len(ours), "run_id": run}, parent, {}]
        self.versions[(key, cid)] = versions  # type: ignore[index]

    @rule(thread=st.sampled_from(THREADS), ns=st.sampled_from(NAMESPACES),
          task=st.sampled_from(["a", "b"]),
          writes=st.lists(st.tuples(st.sampled_from(["x", "y", "__error__"]),
                                    st.integers(0, 5)), min_size=1, max_size=3))
    def put_writes(self, thread: str, ns: str, task: str,
                   writes: list[tuple[str, int]]) -> None:
        ours = self.model.get((thread, ns))
        if not ours:
            return
        cid = max(ours)
        self.saver.put_writes(cfg(thread, ns, cid), writes, task, f"path-{task}")
        stored = ours[cid][3]
        for idx, (ch, v) in enumerate(writes):
            k = (task, -1 if ch == "__error__" else idx)
            if k[1] >= 0 and k in stored:
                continue
            stored[k] = (task, ch, v, f"path-{task}")

    @rule(thread=st.sampled_from(THREADS))
    def delete_thread(self, thread: str) -> None:
        self.saver.delete_thread(thread)
        for key in [k for k in self.model if k[0] == thread]:
            del self.model[key]

    @rule(src=st.sampled_from(THREADS), dst=st.sampled_from(THREADS))
    def copy_thread(self, src: str, dst: str) -> None:
        if src == dst:
            return
        self.saver.copy_thread(src, dst)
        for (thread, ns), cps in list(self.model.items()):
            if thread == src and cps:
                target = self.model.setdefault((dst, ns), {})
                for cid, (vals, md, parent, writes) in cps.items():
                    old_writes = target[cid][3] if cid in target else {}
                    target[cid] = [vals, md, parent, {**old_writes, **writes}]
                    self.versions[((dst, ns), cid)] = self.versions[((src, ns), cid)]  # type: ignore[index]

    @rule(threads=st.lists(st.sampled_from(THREADS), max_size=2))
    def prune(self, threads: list[str]) -> None:
        self.saver.prune(threads)
        for (thread, _ns), cps in self.model.items():
            if thread in threads and cps:
                last = max(cps)
                for cid in [c for c in cps if c != last]:
                    del cps[cid]

    @rule(run=st.sampled_from(["r1", "r2"]))
    def delete_for_runs(self, run: str) -> None:
        self.saver.delete_for_runs([run])
        for cps in self.model.values():
            for cid in [c for c, row in cps.items() if row[1]["run_id"] == run]:
                del cps[cid]

    @rule()
    def reopen(self) -> None:
        self.saver.close()
        self.saver = MMSBSaver(os.path.join(self.dir, "bus"))

    @invariant()
    def everything_listed_is_the_model(self) -> None:
        expected = []
        for (thread, ns), cps in self.model.items():
            for cid, (vals, md, parent, writes) in cps.items():
                pending = sorted(writes.values(), key=lambda w: (w[3], w[0]))
                expected.append((thread, ns, cid, vals, md, parent,
                                 sorted((w[0], w[1], w[2]) for w in pending)))
        got = []
        for t in self.saver.list(None):
            conf = t.config["configurable"]
            parent = None if t.parent_config is None else \
                t.parent_config["configurable"]["checkpoint_id"]
            got.append((conf["thread_id"], conf["checkpoint_ns"], conf["checkpoint_id"],
                        t.checkpoint["channel_values"],
                        {k: t.metadata[k] for k in ("source", "step", "run_id")}, parent,
                        sorted(t.pending_writes or [])))
        key = lambda r: (r[0], r[1], r[2])  # noqa: E731
        assert sorted(got, key=key) == sorted(expected, key=key)


SaverMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25,
                                          deadline=None)
test_the_saver_behaves_like_its_model = pytest.mark.slow(SaverMachine.TestCase)


def test_default_durability_reaches_the_same_end(tmp_path: Path) -> None:
    """With LangGraph's default durability ("async": checkpoints saved in the
    background while the next step runs) the run ends where SQLite's does, sync and
    async."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    expected = lg_graph.build().compile(checkpointer=SqliteSaver(conn)).invoke(
        lg_graph.first_input(), {"configurable": {"thread_id": "d"}})
    conn.close()
    with MMSBSaver(tmp_path / "bus") as saver:
        graph = lg_graph.build().compile(checkpointer=saver)
        assert graph.invoke(lg_graph.first_input(), {"configurable": {"thread_id": "d"}}) == expected
        got = asyncio.run(graph.ainvoke(lg_graph.first_input(),
                                        {"configurable": {"thread_id": "e"}}))
        assert got == expected
        assert graph.get_state({"configurable": {"thread_id": "e"}}).values == expected
