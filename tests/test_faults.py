"""Faults a durable bus must survive: hostile configuration, metadata the reader could
not read back, allocation failures, odd files where bus files belong, full and
read-only disks, and readers beside a busy writer. Each test pins one failure mode to a
typed error or to a state that is exact (or a true earlier state)."""

from __future__ import annotations

import math
from typing import Any

import pytest

import mmsb


def cfg(**kw: Any) -> mmsb.MMSBConfig:
    kw.setdefault("enable_gpu", False)
    return mmsb.MMSBConfig(**kw)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("fsync_batch_ms", math.inf), ("fsync_batch_ms", 1e300), ("fsync_batch_ms", math.nan),
    ("fsync_batch_ms", -1.0), ("checkpoint_interval", math.inf),
    ("checkpoint_interval", math.nan), ("checkpoint_interval", -math.inf),
    ("page_size_default", 1 << 32), ("page_size_default", 0), ("page_size_default", 4.0),
    ("max_tlog_size", 1 << 41), ("max_tlog_size", True), ("segment_bytes", 1 << 41),
    ("segment_bytes", "64"), ("retain_checkpoints", 1 << 21), ("retain_checkpoints", 0),
    ("retain_checkpoints", 2.0), ("fsync", ["always"]), ("recovery", None),
    ("propagation_mode", object()), ("enable_logging", 1),
])
def test_config_field_out_of_range_is_refused(field: str, value: Any, tmp_path: Any) -> None:
    c = cfg(**{field: value})
    with pytest.raises(mmsb.InvalidArgumentError, match=field):
        mmsb.MMSBState(c)
    with pytest.raises(mmsb.InvalidArgumentError, match=field):
        mmsb.mmsb_start(config=c, path=tmp_path / "bus")


def test_config_bounds_match_the_engine() -> None:
    from mmsb._core.limits import MAX_PAGE_SIZE

    mmsb.MMSBState(cfg(page_size_default=MAX_PAGE_SIZE, fsync_batch_ms=0,
                       checkpoint_interval=0))
    with pytest.raises(mmsb.InvalidArgumentError):
        mmsb.MMSBState(cfg(page_size_default=MAX_PAGE_SIZE + 1))
