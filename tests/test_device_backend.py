"""The device backends against the conformance kit: the host backend always, the CuPy
backends (gpu, unified) when this machine has a usable device, skipped with the probe's
reason otherwise."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from mmsb._device import (
    LOCATIONS,
    DeviceBackend,
    HostBackend,
    get_backend,
    is_unified_memory_available,
    normalize_location,
    slot_class,
    unavailable_reason,
)
from mmsb._device.conformance import CHECKS, check_arena_property, check_model_property
from mmsb.errors import GPUMemoryError, InvalidArgumentError, UnsupportedLocationError
from mmsb.types import PageLocation

CHUNK = 4096


def _maker(location: str) -> Callable[[], DeviceBackend]:
    reason = unavailable_reason(location)
    if reason is not None:
        pytest.skip(f"{location} backend unavailable: {reason}")
    return lambda: get_backend(location, chunk_size=CHUNK)


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(location: str, check: str) -> None:
    CHECKS[check](_maker(location))


@pytest.mark.parametrize("location", LOCATIONS)
def test_model_property(location: str) -> None:
    check_model_property(_maker(location), max_examples=60)


@pytest.mark.parametrize("location", LOCATIONS)
def test_arena_property(location: str) -> None:
    check_arena_property(_maker(location), max_examples=60)


def test_size_classes() -> None:
    assert [slot_class(n) for n in (1, 16, 17, 64, 65, 80, 81, 128, 129, 1024, 1025)] == \
        [16, 16, 32, 64, 80, 80, 96, 128, 160, 1024, 1280]
    for n in range(1, 5000):
        c = slot_class(n)
        assert c >= n and c % 16 == 0 and slot_class(c) == c
        assert n <= 64 or c <= n * 1.25


def test_locations() -> None:
    assert normalize_location("GPU") == "gpu"
    assert normalize_location(PageLocation.UNIFIED) == "unified"
    with pytest.raises(UnsupportedLocationError):
        normalize_location("tpu")
    with pytest.raises(UnsupportedLocationError):
        get_backend("disk")
    assert unavailable_reason("cpu") is None
    assert isinstance(get_backend(PageLocation.CPU), HostBackend)


@pytest.mark.parametrize("location", ["gpu", "unified"])
def test_unusable_device_is_refused_with_its_reason(location: str) -> None:
    reason = unavailable_reason(location)
    if reason is None:
        assert get_backend(location).location == location
        return
    with pytest.raises(GPUMemoryError) as info:
        get_backend(location)
    assert reason in str(info.value)
    assert not is_unified_memory_available()


def test_bad_chunk_size_is_refused() -> None:
    for bad in (0, 100, 4097, 2.0, True):
        with pytest.raises(InvalidArgumentError):
            HostBackend(chunk_size=bad)  # type: ignore[arg-type]


def test_host_backend_reads_dlpack_and_refuses_other_objects() -> None:
    b = HostBackend(chunk_size=CHUNK)
    s = b.alloc(8)

    class Exporter:
        def __init__(self, a: np.ndarray) -> None:
            self._a = a

        def __dlpack__(self, **kw: object) -> object:
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self) -> tuple[int, int]:
            return self._a.__dlpack_device__()

    b.copy_in(s, Exporter(np.arange(8, dtype=np.uint8)))
    assert bytes(b.copy_out(s)) == bytes(range(8))


def test_import_mmsb_and_device_layer_never_need_cupy() -> None:
    # A fresh interpreter where importing cupy fails: the package and the probe load,
    # and the probe says why there is no device.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'cupy' or name.startswith('cupy.'):\n"
        "            raise ImportError('blocked')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mmsb, mmsb._device as d\n"
        "assert 'cupy' not in sys.modules\n"
        "r = d.unavailable_reason('gpu')\n"
        "assert r and 'CuPy' in r, r\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert importlib.import_module("mmsb._device.host").HostBackend is HostBackend
