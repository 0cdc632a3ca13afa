"""What the instrumentation layer captures: :class:`InstrumentationConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["InstrumentationConfig", "ARTEFACT_KINDS"]

ARTEFACT_KINDS = ("source", "ast", "ir")
"""The artefacts a code unit can have on pages, in COMPILER-edge order."""


@dataclass(frozen=True, slots=True)
class InstrumentationConfig:
    """Settings of a state's instrumentation. Frozen; every field is checked when it is
    built (:class:`~mmsb.InvalidArgumentError` naming the field)."""

    modules: tuple[str, ...] = ()
    """fnmatch patterns of module names (``"myapp.*"``) whose modules are captured when
    imported (and again when reloaded or re-imported), with the functions and methods
    they define. MMSB's own modules are never captured."""
    functions: tuple[Callable[..., Any], ...] = ()
    """Functions (or methods, callable objects) captured directly."""
    calls: bool = False
    """Record calls of instrumented functions into per-thread ring pages."""
    attributes: bool = True
    """Give instances of ``@tracked`` classes a page and log their attribute writes."""
    capture: tuple[str, ...] = ARTEFACT_KINDS
    """Which artefacts go on pages: any of ``"source"``, ``"ast"``, ``"ir"``."""
    provenance: bool = True
    """Record, on each recomputed page, which code produced its propagated deltas."""
    call_sample_every: int = 1
    """Record one call in every N of each function (1: every call)."""
    ring_capacity: int = 4096
    """Call records one thread's ring page holds (the oldest are overwritten)."""
    flush_every: int = 256
    """Buffered call records that trigger a flush into the ring page, when the state can
    take a write at that moment (otherwise they wait for the next chance or
    :func:`~mmsb.flush_call_events`)."""
    max_artefact_bytes: int = 4 << 20
    """Largest artefact put on a page; a larger one is left out (and named in
    ``instrumentation_report``)."""

    def __post_init__(self) -> None:
        mods = self.modules
        if isinstance(mods, str):
            mods = (mods,)
        try:
            mods = tuple(mods)
        except TypeError:
            raise InvalidArgumentError(
                f"InstrumentationConfig.modules must be patterns (str), not {mods!r}") from None
        for m in mods:
            if not isinstance(m, str) or not m.strip():
                raise InvalidArgumentError(
                    f"InstrumentationConfig.modules holds {m!r}; each must be a non-empty "
                    "fnmatch pattern of module names such as 'myapp.*'")
        object.__setattr__(self, "modules", mods)
        fns = self.functions
        if callable(fns):
            fns = (fns,)
        try:
            fns = tuple(fns)
        except TypeError:
            raise InvalidArgumentError(
                f"InstrumentationConfig.functions must be callables, not {fns!r}") from None
        for f in fns:
            if not callable(f):
                raise InvalidArgumentError(
                    f"InstrumentationConfig.functions holds {f!r}, which is not callable")
        object.__setattr__(self, "functions", fns)
        for name in ("calls", "attributes", "provenance"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(
                    f"InstrumentationConfig.{name} must be True or False, not "
                    f"{getattr(self, name)!r}")
        cap = self.capture
        if isinstance(cap, str):
            cap = (cap,)
        try:
            cap = tuple(cap)
        except TypeError:
            raise InvalidArgumentError(
                f"InstrumentationConfig.capture must name artefacts, not {cap!r}") from None
        bad = [c for c in cap if c not in ARTEFACT_KINDS]
        if bad or len(set(cap)) != len(cap):
            raise InvalidArgumentError(
                f"InstrumentationConfig.capture is {cap!r}; use distinct names from "
                f"{ARTEFACT_KINDS}")
        object.__setattr__(self, "capture", tuple(k for k in ARTEFACT_KINDS if k in cap))
        for name, lo, hi in (("call_sample_every", 1, 1 << 30), ("ring_capacity", 1, 1 << 24),
                             ("flush_every", 1, 1 << 24), ("max_artefact_bytes", 64, 64 << 20)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidArgumentError(
                    f"InstrumentationConfig.{name} must be an int from {lo} to {hi}, not {v!r}")

    def replace(self, **changes: Any) -> InstrumentationConfig:
        """A copy with ``changes`` (checked like a new config).

        Raises:
            InvalidArgumentError: an unknown option or a bad value.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown instrumentation option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)
