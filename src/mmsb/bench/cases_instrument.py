"""Cases for the instrumentation layer: what call hooks cost on a module doing real work,
and that instrumentation costs nothing once disabled.

The workloads live in a module written to the run's temporary directory and imported
from there, as an application's own module would be. Instrumented and plain runs of the
same workload are timed in turn (A, B, A, B …); the overhead is the median of the
ratios of neighbouring batches, so drift and bursts of other load hit both alike.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
import types
from typing import Any

from ._harness import Measurement, summarize
from ._registry import CaseOutcome, RunContext, case, expect

WORKLOAD = '''
import numpy as np


def load(raw):
    return np.frombuffer(raw, dtype=np.float64).reshape(-1, 4)


def clean(a):
    return a[np.isfinite(a).all(axis=1)]


def features(a):
    return np.column_stack((a[:, 0] * a[:, 1], np.log1p(np.abs(a[:, 2])), a[:, 3] ** 2))


def normalize(f):
    return (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-9)


def score(f, w):
    return f @ w


def top(s, k):
    idx = np.argpartition(s, -k)[-k:]
    return idx[np.argsort(s[idx])]


def pipeline(raw, w):
    return top(score(normalize(features(clean(load(raw)))), w), 10)


def tokenize(text):
    return text.lower().split()


def count(tokens):
    counts = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return counts


def top_words(counts, k):
    return sorted(counts.items(), key=lambda kv: -kv[1])[:k]


def word_report(text):
    return top_words(count(tokenize(text)), 10)


class Cursor:
    def __init__(self):
        self.position = 0
        self.total = 0


def walk(cursor, n):
    for i in range(n):
        cursor.position = i
        cursor.total += i
    return cursor.total
'''

_FUNCTIONS = ("load", "clean", "features", "normalize", "score", "top", "pipeline",
              "tokenize", "count", "top_words", "word_report", "walk")


def _workload(ctx: RunContext) -> Any:
    cached = ctx.cache.get("instrument_workload")
    if cached is not None:
        return cached
    import numpy as np

    name = "mmsbbench_workload"
    (ctx.tmpdir / f"{name}.py").write_text(WORKLOAD)
    sys.path.insert(0, str(ctx.tmpdir))
    try:
        importlib.invalidate_caches()
        mod = importlib.import_module(name)
    finally:
        sys.path.remove(str(ctx.tmpdir))
    ctx.on_close(lambda: sys.modules.pop(name, None))
    rng = np.random.default_rng(ctx.seed)
    rows = ctx.pick(4000, 1000)
    data = rng.normal(size=(rows, 4))
    data[rng.integers(0, rows, rows // 50), 2] = np.nan
    words = [f"w{int(i)}" for i in rng.zipf(1.3, ctx.pick(4000, 1000)) % 500]
    out = (mod, data.tobytes(), rng.normal(size=3), " ".join(words))
    ctx.cache["instrument_workload"] = out
    return out


def _instrumented_state(ctx: RunContext, mod: types.ModuleType) -> Any:
    import mmsb

    state = ctx.new_state()
    fns = tuple(getattr(mod, n) for n in _FUNCTIONS)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(functions=fns, calls=True))
    return state


def _alternating(ctx: RunContext, run: Any, toggle: Any
                 ) -> tuple[Measurement, Measurement, float]:
    """Time ``run`` in batches with ``toggle(False)`` / ``toggle(True)`` in turn before
    each (never timed): the (off, on) measurements and the median of the ratios of
    neighbouring on/off batches, so drift and bursts of other load hit both alike."""
    samples: dict[bool, list[float]] = {False: [], True: []}
    flip = [True]

    def setup(n: int) -> bool:
        flip[0] = not flip[0]
        toggle(flip[0])
        return flip[0]

    def batch(on: bool, n: int) -> None:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            run()
        samples[on].append((time.perf_counter_ns() - t0) / n)

    inner = ctx.pick(10, 4)
    ctx.measure(batch, setup=setup, inner=inner, repeats=2 * ctx.pick(81, 7))
    toggle(True)
    out = []
    skip = ctx.settings.warmup
    for on in (False, True):
        kept = samples[on][skip:] or samples[on]
        out.append(Measurement(stats=summarize(kept, inner), samples_ns=tuple(kept)))
    pairs = [b / a for a, b in zip(samples[False][skip:], samples[True][skip:], strict=False)]
    ratio = statistics.median(pairs) if pairs else out[1].stats.median_ns / out[0].stats.median_ns
    return out[0], out[1], ratio


def _paired(ctx: RunContext, run: Any, key: str) -> CaseOutcome:
    """Time ``run`` with the call hook removed and installed, in turn."""
    import mmsb

    from .._instrument.manager import manager_of

    mod = _workload(ctx)[0]
    state = _instrumented_state(ctx, mod)
    mgr = manager_of(state)
    expect(mgr is not None and mgr.calls is not None, "call hooks were not installed")
    assert mgr is not None and mgr.calls is not None
    recorder = mgr.calls

    def toggle(on: bool) -> None:
        if on:
            recorder.install()
        else:
            recorder.uninstall(flush=False)

    try:
        off, on, ratio = _alternating(ctx, run, toggle)
        mmsb.flush_call_events(state)
        events = mmsb.call_events(state)
        expect(len(events) > 0, "no call was recorded")
        metrics = {
            "plain_median_ns": off.stats.median_ns,
            "overhead_ratio": round(ratio, 4),
            "overhead_pct": round((ratio - 1) * 100, 2),
            "calls_in_ring": len(events),
            "hook": "sys.monitoring" if sys.version_info >= (3, 12) else "trampolines",
            "workload": key,
        }
    finally:
        mmsb.disable_instrumentation(state)
    return CaseOutcome(on, metrics)


@case("instrumentation", "calls_numeric_pipeline",
      "call hooks on: a 7-function numpy pipeline over 4,000 rows, per run "
      "(metrics: overhead against the same run with the hook paused)")
def calls_numeric(ctx: RunContext) -> CaseOutcome:
    mod, raw, w, _text = _workload(ctx)
    expect(len(mod.pipeline(raw, w)) == 10, "the pipeline returned a wrong result")
    return _paired(ctx, lambda: mod.pipeline(raw, w), "numeric pipeline")


@case("instrumentation", "calls_text_report",
      "call hooks on: word counts of 4,000 tokens in plain Python (a call-dense, "
      "builtin-heavy loop), per run")
def calls_text(ctx: RunContext) -> CaseOutcome:
    mod, _raw, _w, text = _workload(ctx)
    expect(len(mod.word_report(text)) == 10, "the word report returned a wrong result")
    return _paired(ctx, lambda: mod.word_report(text), "text report")


@case("instrumentation", "disabled",
      "instrumentation enabled (calls, tracked attributes) then disabled: the numeric "
      "pipeline and an attribute-writing loop on a @tracked class, per run "
      "(metrics: against the same work on the undecorated class, in turn)")
def disabled(ctx: RunContext) -> CaseOutcome:
    import mmsb

    from .._instrument.calls import hook_installed
    from .._instrument.manager import finder_installed
    from .._instrument.tracked import wrappers_installed

    mod, raw, w, _text = _workload(ctx)
    cursor_cls = mod.Cursor
    tracked_cls = mmsb.tracked(type("TrackedCursor", (cursor_cls,), {}))

    which = [cursor_cls]

    def run() -> None:
        mod.pipeline(raw, w)
        mod.walk(which[0](), 200)

    def toggle(on: bool) -> None:
        which[0] = tracked_cls if on else cursor_cls

    state = ctx.new_state()
    fns = tuple(getattr(mod, n) for n in _FUNCTIONS)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(
        functions=fns, calls=True, modules=("mmsbbench_*",)))
    expect(hook_installed() and finder_installed() and wrappers_installed(tracked_cls),
           "enabling installed nothing")
    mmsb.disable_instrumentation(state)
    expect(not hook_installed() and not finder_installed()
           and not wrappers_installed(tracked_cls) and state.recompute_hook is None,
           "disabling left a hook installed")
    base, after, ratio = _alternating(ctx, run, toggle)
    return CaseOutcome(after, {
        "baseline_median_ns": base.stats.median_ns,
        "overhead_ratio": round(ratio, 4),
        "overhead_pct": round((ratio - 1) * 100, 2),
        "hooks_left": 0,
    })
