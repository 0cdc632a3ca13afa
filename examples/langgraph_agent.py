"""A LangGraph agent checkpointed by MMSB: run, resume, time travel, fork, and look at the
history byte by byte.

Needs the extra: pip install 'mmsb[langgraph]' langgraph
Run: python examples/langgraph_agent.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from mmsb.integrations.langgraph import MMSBSaver


class State(TypedDict):
    messages: Annotated[list[Any], add_messages]
    turns: int


def agent(state: State) -> dict[str, Any]:
    """A deterministic stand-in for a model call."""
    n = state.get("turns", 0)
    return {"messages": [AIMessage(content=f"step {n}: thinking about it", id=f"ai-{n}")],
            "turns": n + 1}


def tool(state: State) -> dict[str, Any]:
    n = state["turns"]
    return {"messages": [HumanMessage(content=f"tool output {n}", id=f"tool-{n}")]}


def build() -> Any:
    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tool", tool)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", lambda s: "tool" if s["turns"] < 4 else END,
                                ["tool", END])
    graph.add_edge("tool", "agent")
    return graph


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mmsb-langgraph-") as tmp:
        tour(Path(tmp) / "bus")


def tour(bus: Path) -> None:
    config = {"configurable": {"thread_id": "demo"}}

    # 1. Run the agent with a durable bus as its checkpointer.
    with MMSBSaver(bus) as saver:
        app = build().compile(checkpointer=saver)
        final = app.invoke({"messages": [HumanMessage(content="hi", id="user-0")], "turns": 0},
                           config)
        print(f"ran {final['turns']} turns, {len(final['messages'])} messages")

    # 2. Reopen: the whole history is back (as after a crash).
    with MMSBSaver(bus) as saver:
        app = build().compile(checkpointer=saver)
        history = list(app.get_state_history(config))
        print(f"reopened: {len(history)} checkpoints")

        # 3. Time travel to step 2 and fork from there.
        past = next(s for s in history if s.metadata["step"] == 2)
        print(f"step 2 had {len(past.values['messages'])} messages, next: {past.next}")
        forked = app.update_state(past.config,
                                  {"messages": [HumanMessage(content="try again", id="fork")]})
        out = app.invoke(None, forked)
        print(f"the fork ended with: {out['messages'][-1].content!r}")

        # 4. MMSB's view: what changed between two checkpoints, byte by byte ...
        for change in saver.diff(past.config, config):
            print(f"  {change.channel}: {change.status}, {change.changed_bytes} bytes differ")
        # ... every version of the messages channel, and who wrote which bytes.
        for v in saver.history(config, "messages"):
            print(f"  step {v.step}: {v.size} bytes, {v.changed_bytes} changed, LSN {v.lsn}")
        blame = saver.blame(config, "messages")
        print(f"  {len(blame)} byte ranges; the last {blame[-1].stop - blame[-1].start} bytes "
              f"came from step {blame[-1].step}")
        ref = saver.locate(config, "messages")
        print(f"the messages live on page {ref.page_id} (`mmsb blame BUS {ref.page_id}` "
              "shows each byte's delta)")

        # 5. Fork a whole thread: the history is shared, not copied.
        saver.copy_thread("demo", "demo-copy")
        copy = app.get_state({"configurable": {"thread_id": "demo-copy"}})
        print(f"copied thread: {len(copy.values['messages'])} messages")


if __name__ == "__main__":
    main()
