"""State lifecycle: start/stop, the context-manager forms, the active state."""

from __future__ import annotations

import warnings

import pytest

import mmsb
from conftest import needs_no_cuda, pages_view


@pytest.fixture(autouse=True)
def _restore_active():
    before = mmsb.active_state()
    yield
    assert mmsb.active_state() is before, "a test leaked an active state"


def test_start_and_stop() -> None:
    before = mmsb.active_state()
    s = mmsb.mmsb_start(enable_gpu=False)
    try:
        assert isinstance(s, mmsb.MMSBState)
        assert mmsb.active_state() is s
        p = mmsb.create_page(s, 8)
        mmsb.update_page(s, p.id, b"12345678")
    finally:
        mmsb.mmsb_stop(s)
    assert mmsb.active_state() is before


def test_start_with_config() -> None:
    cfg = mmsb.MMSBConfig(enable_gpu=False, page_size_default=64)
    s = mmsb.mmsb_start(config=cfg)
    try:
        assert mmsb.create_page(s).size == 64
    finally:
        mmsb.mmsb_stop(s)


def test_start_context_manager() -> None:
    before = mmsb.active_state()
    with mmsb.mmsb_start(enable_gpu=False) as s:
        assert isinstance(s, mmsb.MMSBState)
        assert mmsb.active_state() is s
        mmsb.create_page(s, 4)
    assert mmsb.active_state() is before


def test_start_context_manager_on_error() -> None:
    before = mmsb.active_state()
    with pytest.raises(KeyError):
        with mmsb.mmsb_start(enable_gpu=False):
            raise KeyError("boom")
    assert mmsb.active_state() is before


def test_stop_with_checkpoint(tmp_path) -> None:
    s = mmsb.mmsb_start(enable_gpu=False)
    p = mmsb.create_page(s, 8)
    mmsb.update_page(s, p.id, b"persist!")
    view = pages_view(s)
    path = tmp_path / "stop.ckpt"
    mmsb.mmsb_stop(s, checkpoint_path=str(path))
    assert path.exists()
    t = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    mmsb.load_checkpoint(t, str(path))
    assert pages_view(t) == view


def test_active_nesting() -> None:
    a = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    b = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    outer = mmsb.active_state()
    with mmsb.active(a) as got:
        assert got is a or got is None
        assert mmsb.active_state() is a
        with mmsb.active(b):
            assert mmsb.active_state() is b
        assert mmsb.active_state() is a
        with pytest.raises(ValueError):
            with mmsb.active(b):
                raise ValueError("inner")
        assert mmsb.active_state() is a
    assert mmsb.active_state() is outer


def test_active_state_top_level_is_none() -> None:
    # no test leaves an active state behind (checked by the autouse fixture), so at top level:
    assert mmsb.active_state() is None


def test_stopping_inactive_state_keeps_active() -> None:
    a = mmsb.mmsb_start(enable_gpu=False)
    b = mmsb.MMSBState(mmsb.MMSBConfig(enable_gpu=False))
    try:
        mmsb.mmsb_stop(b)
        assert mmsb.active_state() is a
    finally:
        mmsb.mmsb_stop(a)


@needs_no_cuda
def test_enable_gpu_true_without_cuda_warns_and_falls_back() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = mmsb.mmsb_start(enable_gpu=True)
    try:
        assert caught, "expected a warning about falling back to CPU"
        text = " ".join(str(w.message).lower() for w in caught)
        assert "gpu" in text or "cuda" in text
        p = mmsb.create_page(s, 8)
        assert p.location in (mmsb.PageLocation.CPU, "cpu")
    finally:
        mmsb.mmsb_stop(s)


@needs_no_cuda
def test_enable_gpu_auto_detect_without_cuda() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = mmsb.mmsb_start()
    try:
        assert mmsb.create_page(s, 8).location in (mmsb.PageLocation.CPU, "cpu")
    finally:
        mmsb.mmsb_stop(s)
