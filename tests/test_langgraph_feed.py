"""The change feed of one LangGraph thread (``thread_changes``), followed from another
process while a graph runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph")

import mmsb  # noqa: E402
from mmsb.integrations.langgraph import MMSBSaver, thread_changes  # noqa: E402

SRC = str(Path(mmsb.__file__).resolve().parent.parent)

_GRAPH = textwrap.dedent("""
    import operator, sys, time
    from typing import Annotated, TypedDict
    sys.path.insert(0, {src!r})
    from langgraph.graph import END, START, StateGraph
    from mmsb.integrations.langgraph import MMSBSaver

    class S(TypedDict):
        messages: Annotated[list, operator.add]

    def node(s):
        return {{"messages": [f"message {{len(s['messages'])}}"]}}

    g = StateGraph(S)
    g.add_node("a", node)
    g.add_edge(START, "a")
    g.add_edge("a", END)
    with MMSBSaver({path!r}) as saver:
        app = g.compile(checkpointer=saver)
        print("open", flush=True)
        sys.stdin.readline()
        for step in range({steps}):
            for thread in ("A", "B"):
                app.invoke({{"messages": ["hi"]}}, {{"configurable": {{"thread_id": thread}}}})
        print("done", flush=True)
        sys.stdin.readline()
""")


def test_a_thread_is_followed_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    code = _GRAPH.format(src=SRC, path=str(path), steps=5)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("open")
        feed = thread_changes(path, "A", follow=True, timeout=10)
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = []
        for ev in feed:
            seen.append(ev)
            if sum(e.kind == "journal" for e in seen) >= 10:  # a put and its writes, 5 steps
                break
        feed.close()  # type: ignore[attr-defined]
        assert proc.stdout.readline().startswith("done")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kinds = {e.kind for e in seen}
    assert {"journal", "channel"} <= kinds
    assert [e.lsn for e in seen] == sorted(e.lsn for e in seen)
    assert {e.channel for e in seen if e.kind == "channel"} >= {"messages"}
    # Every event is thread A's: the same feed read afterwards, compared with the pages
    # the saver says belong to A.
    with MMSBSaver(path) as saver:
        pages_a = {pid for (thread, _ns, _ch), pid in saver._owned.items() if thread == "A"}
        pages_a |= {j.page_id for j in saver._journals["A"].values()}
    assert {e.page_id for e in seen} <= pages_a
    replayed = list(thread_changes(path, "A"))
    assert replayed[: len(seen)] == seen
    # Resuming after the last LSN seen gives exactly the rest.
    rest = list(thread_changes(path, "A", since=seen[-1].lsn))
    assert replayed == seen + rest[: len(replayed) - len(seen)]
    assert list(thread_changes(path, "nobody")) == []


def test_thread_changes_refusals(tmp_path: Path) -> None:
    with MMSBSaver(tmp_path / "bus"):
        pass
    with pytest.raises(mmsb.InvalidArgumentError):
        thread_changes(tmp_path / "bus", 42)  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError):
        thread_changes(tmp_path / "bus", "A", since=-1)
    with pytest.raises(mmsb.SerializationError):
        thread_changes(tmp_path / "nothing", "A")
