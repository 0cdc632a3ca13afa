"""@tracked objects: a page per instance, each attribute write a logged delta; the field
history replays and blames like any page; refusals leave object, state and log alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import mmsb
from conftest import assert_unchanged, snapshot
from instrument_helpers import make_state
from mmsb._instrument.tracked import wrappers_installed

state_fixture = pytest.fixture(name="state")(make_state)


@mmsb.tracked
class Position:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y
        self._cache = object()  # private: not tracked, need not be encodable


@mmsb.tracked(fields=("balance",))
class Account:
    def __init__(self) -> None:
        self.balance = 0
        self.note = object()  # untracked field


@mmsb.tracked
@dataclasses.dataclass
class Item:
    name: str
    tags: list[str] = dataclasses.field(default_factory=list)


def test_nothing_is_tracked_without_instrumentation(state: mmsb.MMSBState) -> None:
    # Disabled, the class is exactly as written: no wrapper at all.
    assert not wrappers_installed(Position)
    assert "__setattr__" not in vars(Position) and "__delattr__" not in vars(Position)
    assert Position.__init__.__qualname__ == "Position.__init__"
    assert not hasattr(Position.__init__, "__wrapped__")
    p = Position(1, 2)
    with pytest.raises(mmsb.InvalidArgumentError, match="has no page"):
        mmsb.page_of(p)
    p.x = 5
    assert len(state.pages) == 0 and len(state.tlog) == 0


def test_instances_get_pages_and_writes_are_deltas(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    p = Position(1, 2)
    pid = mmsb.page_of(p)
    assert state.pages[pid].metadata["tracked"] == {"class": f"{__name__}.Position"}
    p.x = 10
    p.y = 20
    p.x = 11
    deltas = mmsb.get_deltas_for_page(state, pid)
    assert [d.source for d in deltas] == ["init:Position", "attr:Position.x", "attr:Position.y",
                                         "attr:Position.x"]
    assert all(d.is_sparse for d in deltas[1:])
    history = mmsb.tracked_history(state, p)
    assert [v.fields for v in history] == [{"x": 1, "y": 2}, {"x": 10, "y": 2},
                                           {"x": 10, "y": 20}, {"x": 11, "y": 20}]
    assert mmsb.tracked_history(state, pid) == history
    blame = mmsb.field_blame(state, p)
    assert blame["x"].lsn == deltas[3].lsn and blame["y"].lsn == deltas[2].lsn
    assert blame["y"].source == "attr:Position.y"
    assert mmsb.verify_state_consistency(state)


def test_replay_rebuilds_the_object_at_a_past_point(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    p = Position(0, 0)
    pid = mmsb.page_of(p)
    for i in range(1, 6):
        p.x = i
    mid = mmsb.get_deltas_for_page(state, pid)[3].lsn
    past = mmsb.replay_to_lsn(state, mid)
    from mmsb._instrument.tracked import decode_tracked

    assert decode_tracked(mmsb.query_page(past, pid)) == {"x": 3, "y": 0}
    assert decode_tracked(mmsb.read_page_at(state, pid, lsn=mid)) == {"x": 3, "y": 0}


def test_growth_resizes_and_deletion_is_logged(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    item = Item("a")
    pid = mmsb.page_of(item)
    size = state.pages[pid].size
    item.tags = ["x" * 50] * 10
    assert state.pages[pid].size > size
    item.name = "b"
    del item.tags
    assert mmsb.tracked_history(state, item)[-1].fields == {"name": "b"}
    assert mmsb.get_deltas_for_page(state, pid)[-1].source == "delattr:Item.tags"
    assert not hasattr(item, "tags")
    assert mmsb.verify_state_consistency(state)


def test_fields_option_limits_what_is_tracked(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    acct = Account()
    acct.note = "free text"
    acct.balance = 5
    fields = [v.fields for v in mmsb.tracked_history(state, acct)]
    assert fields == [{"balance": 0}, {"balance": 5}]


def test_unencodable_value_is_refused_and_nothing_changes(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    p = Position(1, 2)
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidArgumentError, match="msgpack cannot encode"):
        p.x = object()
    assert p.x == 1
    with pytest.raises(mmsb.InvalidArgumentError):
        p.z = {1, 2}
    assert not hasattr(p, "z")
    assert_unchanged(state, before)


def test_a_write_the_state_refuses_leaves_the_attribute(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state)
    item = Item("a")
    before = snapshot(state)
    with pytest.raises(mmsb.InvalidArgumentError), mmsb.batch(state):
        item.tags = ["y" * 400]  # the page must grow, which a batch cannot do
    assert item.tags == []
    assert_unchanged(state, before)


def test_attributes_off_and_stopped_states(state: mmsb.MMSBState) -> None:
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(attributes=False))
    p = Position(1, 1)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.page_of(p)
    mmsb.configure_instrumentation(state, attributes=True)
    q = Position(2, 2)
    pid = mmsb.page_of(q)
    n = len(mmsb.get_deltas_for_page(state, pid))
    assert wrappers_installed(Position)
    mmsb.disable_instrumentation(state)
    assert not wrappers_installed(Position) and "__setattr__" not in vars(Position)
    q.x = 99  # tracking ended with the instrumentation: a plain write
    assert q.x == 99 and len(mmsb.get_deltas_for_page(state, pid)) == n


def test_active_state_decides(state: mmsb.MMSBState) -> None:
    other = mmsb.MMSBState()
    mmsb.enable_instrumentation(other)
    try:
        with mmsb.active(other):
            p = Position(3, 4)
        assert mmsb.page_of(p) in other.pages
        p.y = 7
        assert mmsb.tracked_history(other, p)[-1].fields == {"x": 3, "y": 7}
        assert len(state.pages) == 0
    finally:
        mmsb.disable_instrumentation(other)


def test_classes_without_dict_are_refused() -> None:
    class Slotted:
        __slots__ = ("a",)

    with pytest.raises(mmsb.InvalidArgumentError, match="__dict__"):
        mmsb.tracked(Slotted)
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.tracked(fields="abc")
    for bad in (1, True, 1.5, ["a", 1]):
        with pytest.raises(mmsb.InvalidArgumentError, match="list of attribute names"):
            mmsb.tracked(fields=bad)  # type: ignore[arg-type]
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.tracked(3)  # type: ignore[arg-type]


def test_decoder_refuses_damage() -> None:
    from mmsb._instrument.tracked import decode_tracked

    for bad in (b"", b"XXXX" + bytes(8), b"MTRK\x01\x00\x00\x00\xff\x00\x00\x00",
                b"MTRK\x01\x00\x00\x00\x01\x00\x00\x00\xc1"):
        with pytest.raises(mmsb.SerializationError):
            decode_tracked(bad)


def test_subclass_of_a_tracked_class(state: mmsb.MMSBState) -> None:
    class Position3(Position):
        def __init__(self, x: int, y: int, z: int) -> None:
            super().__init__(x, y)
            self.z = z

    mmsb.enable_instrumentation(state)
    p = Position3(1, 2, 3)
    fields: list[dict[str, Any]] = [v.fields for v in mmsb.tracked_history(state, p)]
    assert fields[-1] == {"x": 1, "y": 2, "z": 3}


def test_threads_writing_one_object(state: mmsb.MMSBState) -> None:
    import threading

    mmsb.enable_instrumentation(state)
    p = Position(0, 0)

    def bump(name: str) -> None:
        for i in range(200):
            setattr(p, name, i)

    threads = [threading.Thread(target=bump, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = mmsb.tracked_history(state, p)[-1].fields
    assert last == {"x": 199, "y": 199} == {"x": p.x, "y": p.y}
    assert len(mmsb.tracked_history(state, p)) == 1 + 199 * 2
