"""A Hypothesis state machine: the bus against a dict-of-bytearray model, including
checkpoint/restore and replay to earlier LSNs."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

import mmsb
from conftest import content_view, new_state, page_ids


class BusMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = new_state()
        self.model: dict[int, bytearray] = {}
        self.epochs: dict[int, int] = {}
        self.adj: dict[int, set[int]] = {}
        self.max_id = 0
        # (lsn, {id: (bytes, epoch)}, generation): generation counts restores
        self.history: list[tuple[int, dict[int, tuple[bytes, int]], int]] = []
        self.generation = 0
        self.tmpdir = tempfile.mkdtemp(prefix="mmsb-sm-")
        self.n_ckpt = 0
        self._note()

    def teardown(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _model_view(self) -> dict[int, tuple[bytes, int]]:
        return {pid: (bytes(buf), self.epochs[pid]) for pid, buf in self.model.items()}

    def _note(self) -> None:
        self.history.append((int(self.state.last_lsn), self._model_view(), self.generation))

    def _reachable(self, src: int, dst: int) -> bool:
        stack, seen = [src], set()
        while stack:
            x = stack.pop()
            if x == dst:
                return True
            if x not in seen:
                seen.add(x)
                stack.extend(self.adj.get(x, ()))
        return False

    def _apply_model_write(self, pid: int, offset: int, data: bytes) -> None:
        buf = self.model[pid]
        if bytes(buf[offset:offset + len(data)]) != data:
            buf[offset:offset + len(data)] = data
            self.epochs[pid] += 1

    # ------------------------------------------------------------------ rules

    @rule(size=st.integers(1, 48))
    def create(self, size: int) -> None:
        p = mmsb.create_page(self.state, size)
        assert p.id > self.max_id
        self.max_id = p.id
        self.model[p.id] = bytearray(size)
        self.epochs[p.id] = 0
        self._note()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def write(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        size = len(self.model[pid])
        offset = data.draw(st.integers(0, size - 1))
        payload = data.draw(st.binary(min_size=1, max_size=size - offset))
        mmsb.write_page(self.state, pid, offset, payload)
        self._apply_model_write(pid, offset, payload)
        self._note()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def update(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        size = len(self.model[pid])
        payload = data.draw(
            st.one_of(st.binary(min_size=size, max_size=size), st.just(bytes(self.model[pid])))
        )
        mmsb.update_page(self.state, pid, payload)
        self._apply_model_write(pid, 0, payload)
        self._note()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def bad_write(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        size = len(self.model[pid])
        with pytest.raises(mmsb.InvalidDeltaError):
            mmsb.write_page(self.state, pid, size, b"x")
        with pytest.raises(mmsb.InvalidDeltaError):
            mmsb.update_page(self.state, pid, bytes(size + 1))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new_size=st.integers(1, 48))
    def resize(self, data, new_size: int) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        old_epoch = self.epochs[pid]
        mmsb.resize_page(self.state, pid, new_size)
        buf = self.model[pid]
        if new_size <= len(buf):
            del buf[new_size:]
        else:
            buf.extend(bytes(new_size - len(buf)))
        # docs/API.md: a resize keeps the epoch unchanged
        assert int(self.state.pages[pid].epoch) == old_epoch
        assert self.state.pages[pid].size == new_size
        self._note()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.model)))
        mmsb.delete_page(self.state, pid)
        del self.model[pid]
        del self.epochs[pid]
        self.adj.pop(pid, None)
        for kids in self.adj.values():
            kids.discard(pid)
        with pytest.raises(mmsb.PageNotFoundError):
            mmsb.query_page(self.state, pid)
        self._note()

    @precondition(lambda self: len(self.model) >= 1)
    @rule(data=st.data())
    def add_edge(self, data) -> None:
        ids = sorted(self.model)
        parent = data.draw(st.sampled_from(ids))
        child = data.draw(st.sampled_from(ids))
        if child in self.adj.get(parent, set()):
            return
        if parent == child or self._reachable(child, parent):
            with pytest.raises(mmsb.GraphCycleError):
                mmsb.add_dependency(self.state, parent, child, mmsb.DATA_DEPENDENCY)
            return
        mmsb.add_dependency(self.state, parent, child, mmsb.DATA_DEPENDENCY)
        self.adj.setdefault(parent, set()).add(child)
        self._note()

    @rule()
    def checkpoint_restore(self) -> None:
        self.n_ckpt += 1
        path = os.path.join(self.tmpdir, f"c{self.n_ckpt}.ckpt")
        mmsb.checkpoint_log(self.state, path)
        fresh = new_state()
        mmsb.load_checkpoint(fresh, path)
        self.state = fresh
        self.generation += 1
        self._note()

    @precondition(lambda self: len(self.history) > 1)
    @rule(data=st.data())
    def replay_earlier(self, data) -> None:
        lsn, view, gen = data.draw(st.sampled_from(self.history))
        # The log is never compressed here (max_tlog_size is far away) and a checkpoint
        # carries the retained log, so every earlier LSN stays replayable, also across
        # restores (generation ``gen`` is only kept to make failures easier to read).
        r = mmsb.replay_to_lsn(self.state, lsn)
        assert content_view(r) == view, (
            f"replay_to_lsn({lsn}) differs from the model (recorded in generation {gen}, "
            f"now {self.generation})"
        )

    # ------------------------------------------------------------------ invariants

    @invariant()
    def pages_equal_model(self) -> None:
        assert page_ids(self.state) == sorted(self.model)
        for pid, buf in self.model.items():
            assert mmsb.query_page(self.state, pid) == bytes(buf), f"page {pid} bytes"
            assert int(self.state.pages[pid].epoch) == self.epochs[pid], f"page {pid} epoch"
            assert self.state.pages[pid].size == len(buf)

    @invariant()
    def edges_equal_model(self) -> None:
        for pid in self.model:
            kids = {int(c) for c, _ in mmsb.get_children(self.state.graph, pid)}
            assert kids == self.adj.get(pid, set())

    @invariant()
    def consistent(self) -> None:
        assert mmsb.verify_state_consistency(self.state)

    @invariant()
    def internal_invariants(self) -> None:
        # MMSBState._check asserts the page table's, the arena's, the log's and the
        # graph's own _check() invariants, and how they agree with each other
        self.state._check()


BusMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBusMachine = BusMachine.TestCase
