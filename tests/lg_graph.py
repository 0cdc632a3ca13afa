"""A small deterministic LangGraph agent for the checkpointer tests (no model).

``build()`` returns a ``StateGraph`` builder: an ``agent`` node answers, a ``tool`` node
replies, until ``count`` reaches ``limit``; in every round two nodes (``left`` and
``right``) also run in parallel, so a superstep has several tasks and pending writes.
Every node appends its name to the file named by ``$LG_TRACE`` (when set), so a test can
see which nodes ran in which process.

Runs use ``durability="sync"``: with LangGraph's default (``"async"``) a checkpoint is
serialized in a background thread while the next step already changes the join
barrier's set of arrived nodes, so what any saver stores of that channel depends on
timing, and two runs cannot be compared.

Run as a script (``python lg_graph.py BUS THREAD``), it runs the graph on an
``MMSBSaver`` at ``BUS``. With ``$LG_HANG_AT`` set, the ``right`` node of that round
waits until ``left`` has finished, writes the file ``$LG_READY`` and hangs until the
process is killed.
"""

from __future__ import annotations

import operator
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

LIMIT = 8


class AgentState(TypedDict):
    messages: Annotated[list[Any], add_messages]
    count: int
    notes: Annotated[list[str], operator.add]


def _trace(name: str, count: int) -> None:
    path = os.environ.get("LG_TRACE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name} {count}\n")


def agent(state: AgentState) -> dict[str, Any]:
    n = state.get("count", 0)
    _trace("agent", n)
    text = f"answer {n}: " + "lorem ipsum dolor sit amet " * 3
    return {"messages": [AIMessage(content=text, id=f"ai-{n}")], "count": n + 1}


def left(state: AgentState) -> dict[str, Any]:
    _trace("left", state["count"])
    return {"notes": [f"left {state['count']}"]}


def right(state: AgentState) -> dict[str, Any]:
    n = state["count"]
    hang = os.environ.get("LG_HANG_AT")
    if hang is not None and int(hang) == n:
        trace = Path(os.environ["LG_TRACE"])
        while f"left {n}" not in trace.read_text(encoding="utf-8"):
            time.sleep(0.01)
        time.sleep(1.0)  # let left's writes reach the saver (put from a background thread)
        Path(os.environ["LG_READY"]).write_text("ready", encoding="utf-8")
        while True:
            time.sleep(1)
    _trace("right", n)
    return {"notes": [f"right {n}"]}


def tool(state: AgentState) -> dict[str, Any]:
    n = state["count"]
    _trace("tool", n)
    return {"messages": [HumanMessage(content=f"tool result {n}", id=f"tool-{n}")]}


def route(state: AgentState) -> list[str] | str:
    return ["left", "right"] if state["count"] < LIMIT else END


def build() -> StateGraph[Any]:
    b = StateGraph(AgentState)
    b.add_node("agent", agent)
    b.add_node("left", left)
    b.add_node("right", right)
    b.add_node("tool", tool)
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", route, ["left", "right", END])
    b.add_edge(["left", "right"], "tool")
    b.add_edge("tool", "agent")
    return b


def first_input() -> dict[str, Any]:
    return {"messages": [HumanMessage(content="hello", id="user-0")], "count": 0, "notes": []}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from mmsb.integrations.langgraph import MMSBSaver

    bus, thread = sys.argv[1], sys.argv[2]
    saver = MMSBSaver(bus)
    graph = build().compile(checkpointer=saver)
    graph.invoke(first_input(), {"configurable": {"thread_id": thread}}, durability="sync")
    saver.close()


if __name__ == "__main__":
    main()
