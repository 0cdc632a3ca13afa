"""The typed error hierarchy, and that real failures raise it with useful messages."""

from __future__ import annotations

from pathlib import Path

import pytest

import mmsb
from conftest import assert_unchanged, needs_no_cuda, snapshot

ALL_ERRORS = [
    "PageNotFoundError", "InvalidDeltaError", "GPUMemoryError", "SerializationError",
    "GraphCycleError", "UnsupportedLocationError", "HistoryUnavailableError",
    "InvalidArgumentError", "MetadataError",
]


@pytest.mark.parametrize("name", ALL_ERRORS)
def test_every_error_is_an_mmsb_error(name: str) -> None:
    cls = getattr(mmsb, name)
    assert issubclass(cls, mmsb.MMSBError)
    assert issubclass(mmsb.MMSBError, Exception)


def test_stdlib_bases() -> None:
    assert issubclass(mmsb.PageNotFoundError, KeyError)
    for name in ("InvalidDeltaError", "SerializationError", "GraphCycleError",
                 "UnsupportedLocationError", "InvalidArgumentError"):
        assert issubclass(getattr(mmsb, name), ValueError), name
    assert issubclass(mmsb.GPUMemoryError, RuntimeError)
    assert issubclass(mmsb.MetadataError, TypeError)


def test_page_not_found_message_and_field(state) -> None:
    with pytest.raises(mmsb.PageNotFoundError) as ei:
        mmsb.query_page(state, 4242)
    assert "4242" in str(ei.value)
    assert ei.value.page_id == 4242
    # catchable as KeyError too
    with pytest.raises(KeyError):
        mmsb.delete_page(state, 4242)


def test_an_id_that_is_not_an_int_is_named_as_what_it_is(state, tmp_path) -> None:
    """The string "1" or the float 1.0 must not read as page 1 (which exists here): the
    message shows the value's repr and its type, on the engine and on a reader alike,
    and nothing changes."""
    import numpy as np

    p = mmsb.create_page(state, 8)
    assert p.id == 1
    before = snapshot(state)
    for bad in ("1", 1.0, True, None, b"1"):
        with pytest.raises(mmsb.PageNotFoundError, match=r"no page has the id .* a page id is "
                           rf"an int, not a {type(bad).__name__}\b") as ei:
            mmsb.query_page(state, bad)
        assert repr(bad) in str(ei.value) and ei.value.page_id is bad
    assert_unchanged(state, before)
    assert "page 7 does not exist" in str(mmsb.PageNotFoundError(np.int64(7), "x"))
    s = mmsb.mmsb_start(path=tmp_path / "bus", enable_gpu=False)
    try:
        mmsb.create_page(s, 8)
        with mmsb.attach(tmp_path / "bus") as r:
            with pytest.raises(mmsb.PageNotFoundError, match="no page has the id '1'"):
                r.read_page("1")
    finally:
        mmsb.mmsb_stop(s)


class _BytesPath:
    """An os.PathLike whose path is bytes."""

    def __fspath__(self) -> bytes:
        return b"bus"


@pytest.mark.parametrize("bad", ["", "bus\0x", 5, None, _BytesPath()],
                         ids=["empty", "nul", "int", "none", "bytes"])
def test_a_path_that_names_no_file_is_refused_everywhere(state, bad, tmp_path,
                                                        monkeypatch) -> None:
    """An empty path (which named the current directory: mmsb_start made a bus there), a
    NUL character (a ValueError from the system call), a non-path or a bytes path:
    InvalidArgumentError from every call that takes a path, and nothing is made in the
    current directory nor changed in the state."""
    monkeypatch.chdir(tmp_path)
    mmsb.create_page(state, 8)
    before = snapshot(state)
    calls = {
        "mmsb_start": lambda: mmsb.mmsb_start(path=bad, enable_gpu=False),
        "open_readonly": lambda: mmsb.open_readonly(bad),
        "attach": lambda: mmsb.attach(bad),
        "checkpoint_log": lambda: mmsb.checkpoint_log(state, bad),
        "load_checkpoint": lambda: mmsb.load_checkpoint(state, bad),
        "replay_from_checkpoint": lambda: mmsb.replay_from_checkpoint(bad),
        # (Refused before Redis is asked: no server needed.)
        "follow": lambda: mmsb.follow("redis://127.0.0.1:1", 1, bad),
    }
    for name, call in calls.items():
        if bad is None and name == "mmsb_start":
            continue  # (path=None is the in-memory state)
        with pytest.raises(mmsb.InvalidArgumentError, match=rf"^{name}\(\) "):
            call()
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(state, before)


class _StrPath:
    """An os.PathLike of the user's own (not a pathlib path) whose path is text."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return self.path


class _Name(str):
    """A str subclass as a path."""


@pytest.mark.parametrize("kind", ["str", "str subclass", "Path", "PathLike"])
def test_every_kind_of_text_path_opens_the_same_bus(tmp_path, kind) -> None:
    """A path is taken as a str, a str subclass, a pathlib path or any os.PathLike
    giving text: each opens (and reopens) the bus it names."""
    where = str(tmp_path / "bus")
    make = {"str": str, "str subclass": _Name, "Path": Path, "PathLike": _StrPath}[kind]
    s = mmsb.mmsb_start(path=make(where), enable_gpu=False)
    mmsb.write_page(s, mmsb.create_page(s, 8).id, 0, b"kept")
    mmsb.mmsb_stop(s)
    again = mmsb.mmsb_start(path=make(where), enable_gpu=False)
    try:
        assert mmsb.query_page(again, 1)[:4] == b"kept"
    finally:
        mmsb.mmsb_stop(again)
    assert mmsb.open_readonly(make(where)).last_lsn == again.last_lsn
    with mmsb.attach(make(where)) as r:
        assert r.read_page(1)[:4] == b"kept"


def test_invalid_delta_message_mentions_page(state) -> None:
    p = mmsb.create_page(state, 8)
    with pytest.raises(mmsb.InvalidDeltaError) as ei:
        mmsb.update_page(state, p.id, b"\x01" * 9)
    msg = str(ei.value)
    assert msg.strip()
    assert str(p.id) in msg
    with pytest.raises(ValueError):
        mmsb.write_page(state, p.id, 7, b"ab")


def test_graph_cycle_message_names_edge(state) -> None:
    a = mmsb.create_page(state, 4)
    b = mmsb.create_page(state, 4)
    mmsb.add_dependency(state, a.id, b.id)
    with pytest.raises(mmsb.GraphCycleError) as ei:
        mmsb.add_dependency(state, b.id, a.id)
    msg = str(ei.value)
    assert str(a.id) in msg and str(b.id) in msg


def test_unsupported_location_message(state) -> None:
    with pytest.raises(mmsb.UnsupportedLocationError) as ei:
        mmsb.create_page(state, 8, location="tpu")
    assert "tpu" in str(ei.value)


@needs_no_cuda
def test_gpu_memory_error_message(state) -> None:
    before = snapshot(state)
    with pytest.raises(mmsb.GPUMemoryError) as ei:
        mmsb.create_page(state, 8, location="gpu")
    msg = str(ei.value).lower()
    assert "gpu" in msg or "cuda" in msg
    assert_unchanged(state, before)


def test_serialization_error_message(tmp_path) -> None:
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    s = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    with pytest.raises(mmsb.SerializationError) as ei:
        mmsb.load_checkpoint(s, str(path))
    assert str(ei.value).strip()
    with pytest.raises(mmsb.SerializationError) as ei2:
        mmsb.deserialize_delta(b"\x00\x01garbage")
    assert str(ei2.value).strip()


def test_invalid_size_is_value_error(state) -> None:
    with pytest.raises(mmsb.MMSBError) as ei:
        mmsb.create_page(state, -5)
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).strip()


def test_metadata_error(state) -> None:
    p = mmsb.create_page(state, 4)
    before = snapshot(state)
    with pytest.raises(mmsb.MMSBError) as ei:
        mmsb.set_metadata(state, p.id, "bad", object())
    assert isinstance(ei.value, mmsb.MetadataError)
    assert str(ei.value).strip()
    assert_unchanged(state, before)


def test_errors_catchable_as_base(state) -> None:
    for call in (
        lambda: mmsb.query_page(state, 99),
        lambda: mmsb.create_page(state, 0),
        lambda: mmsb.create_page(state, 8, location="nowhere"),
        lambda: mmsb.deserialize_delta(b""),
    ):
        with pytest.raises(mmsb.MMSBError):
            call()
