"""Benchmark cases by category: the registry, the per-run context, the case result."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._harness import HarnessSettings, Measurement, measure, measure_paired

__all__ = [
    "CATEGORIES",
    "BenchCheckError",
    "Case",
    "CaseOutcome",
    "CaseResult",
    "CaseSkipped",
    "RunContext",
    "all_cases",
    "case",
    "cases_for",
    "expect",
]

T = TypeVar("T")

CATEGORIES: tuple[str, ...] = (
    "allocation",
    "delta",
    "propagation",
    "persistence",
    "replay",
    "stress",
    "batch",
    "durable",
    "replication",
    "memory",
    "gpu",
    "peers",
    "instrumentation",
    "langgraph",
)
"""Every category, in run order."""

_CASE_MODULES: tuple[str, ...] = (
    "mmsb.bench.cases_core",
    "mmsb.bench.cases_io",
    "mmsb.bench.cases_durable",
    "mmsb.bench.cases_replication",
    "mmsb.bench.cases_memory",
    "mmsb.bench.cases_engine",
    "mmsb.bench.cases_gpu",
    "mmsb.bench.cases_peers",
    "mmsb.bench.cases_instrument",
    "mmsb.bench.cases_langgraph",
)


class CaseSkipped(Exception):
    """Raised by a case that cannot run here (no GPU, peer not installed …)."""


class BenchCheckError(AssertionError):
    """A case's sanity check failed: MMSB (or a peer) returned wrong bytes."""


def expect(condition: object, message: str) -> None:
    """Raise :class:`BenchCheckError` with ``message`` unless ``condition`` holds.

    Unlike ``assert``, this also runs under ``python -O``.
    """
    if not condition:
        raise BenchCheckError(message)


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The outcome of one case, as saved in the results JSON."""

    category: str
    name: str
    description: str
    status: str
    """``"ok"``, ``"skipped"`` or ``"error"``."""
    reason: str | None = None
    """Why it was skipped, or the error."""
    measurement: Measurement | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Case-specific numbers (throughput, ratios, bytes) and notes."""
    wall_s: float = 0.0
    """Wall-clock seconds the case took, setup included."""

    @property
    def key(self) -> str:
        return f"{self.category}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "category": self.category,
            "name": self.name,
            "description": self.description,
            "status": self.status,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        if self.measurement is not None:
            out.update(self.measurement.stats.to_json())
            if self.measurement.alloc is not None:
                out["alloc"] = self.measurement.alloc.to_json()
        out["metrics"] = dict(self.metrics)
        out["wall_s"] = round(self.wall_s, 4)
        return out


class RunContext:
    """What every case of one run shares: mode, settings, a temp dir, a cache.

    ``pick(full, smoke)`` chooses a size by mode; ``measure(...)`` is the harness with
    this run's settings; ``cache`` carries built fixtures between cases of a category
    (the peers build each store once); ``on_close`` registers clean-up.
    """

    def __init__(self, *, smoke: bool, seed: int = 20240601) -> None:
        self.smoke = smoke
        self.seed = seed
        self.settings = HarnessSettings.smoke() if smoke else HarnessSettings.full()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="mmsb-bench-"))
        self.cache: dict[str, Any] = {}
        self._closers: list[Callable[[], object]] = []

    def pick(self, full: T, smoke: T) -> T:
        return smoke if self.smoke else full

    def measure(self, batch: Callable[[Any, int], object], **kwargs: Any) -> Measurement:
        return measure(batch, self.settings, **kwargs)

    def measure_paired(
        self, batches: list[Callable[[Any, int], object]], **kwargs: Any
    ) -> list[Measurement]:
        return measure_paired(batches, self.settings, **kwargs)

    def path(self, name: str) -> Path:
        return self.tmpdir / name

    def mmsb_config(self, **overrides: Any) -> Any:
        """An ``MMSBConfig`` fit for benchmarks: no GPU, no auto-compression."""
        import mmsb

        fields: dict[str, Any] = {"enable_gpu": False, "max_tlog_size": 1 << 60}
        fields.update(overrides)
        return mmsb.MMSBConfig(**fields)

    def new_state(self, **overrides: Any) -> Any:
        import mmsb

        return mmsb.MMSBState(config=self.mmsb_config(**overrides))

    def on_close(self, fn: Callable[[], object]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:  # noqa: S110 - clean-up must not mask results
                pass
        self.cache.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


CaseFn = Callable[[RunContext], "CaseOutcome"]


@dataclass(frozen=True, slots=True)
class CaseOutcome:
    """What a case function returns: its measurement and extra metrics."""

    measurement: Measurement
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Case:
    """One registered benchmark."""

    category: str
    name: str
    description: str
    fn: CaseFn

    @property
    def key(self) -> str:
        return f"{self.category}/{self.name}"


_REGISTRY: dict[str, Case] = {}
_loaded = False


def case(category: str, name: str, description: str) -> Callable[[CaseFn], CaseFn]:
    """Register ``fn(ctx) -> CaseOutcome`` as the case ``category/name``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown benchmark category {category!r}")

    def register(fn: CaseFn) -> CaseFn:
        key = f"{category}/{name}"
        if key in _REGISTRY:
            raise ValueError(f"benchmark case {key!r} registered twice")
        _REGISTRY[key] = Case(category, name, description, fn)
        return fn

    return register


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _CASE_MODULES:
            importlib.import_module(module)
        _loaded = True


def all_cases() -> list[Case]:
    """Every registered case, in category order, then registration order."""
    _load()
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(_REGISTRY.values(), key=lambda c: order[c.category])


def cases_for(categories: Iterable[str]) -> list[Case]:
    """The cases of the given categories, in run order."""
    wanted = set(categories)
    unknown = wanted - set(CATEGORIES)
    if unknown:
        raise ValueError(
            f"unknown benchmark categories: {', '.join(sorted(unknown))} "
            f"(known: {', '.join(CATEGORIES)})"
        )
    return [c for c in all_cases() if c.category in wanted]
