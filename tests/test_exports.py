"""The public API: every name SPEC.md lists is exported from ``mmsb``, exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmsb

# Names SPEC.md lists under State lifecycle, Pages, Deltas, Transaction log/replay,
# Dependency graph/propagation/events, Monitoring and Errors.
SPEC_NAMES = [
    # state lifecycle
    "MMSBConfig", "MMSBState", "mmsb_start", "mmsb_stop", "active", "active_state",
    # pages
    "create_page", "create_pages", "Page", "update_page", "write_page", "query_page",
    "delete_page", "resize_page", "clone_page", "migrate_page",
    # deltas
    "Delta", "create_delta", "route_delta", "batch", "apply_batch", "merge_deltas",
    "delta_byte_count", "serialize_delta", "deserialize_delta",
    # log, checkpoints, replay
    "query_log", "get_deltas_for_page", "get_deltas_in_range", "compute_log_statistics",
    "compress_log", "checkpoint_log", "load_checkpoint", "replay_to_lsn",
    "replay_to_timestamp", "replay_to_epoch", "replay_log", "replay_page_history",
    "verify_state_consistency", "compute_diff", "incremental_replay",
    "replay_with_predicate", "replay_from_checkpoint",
    # graph, propagation, events
    "ShadowPageGraph", "EdgeType", "DATA_DEPENDENCY", "CONTROL_DEPENDENCY",
    "GPU_SYNC_DEPENDENCY", "COMPILER_DEPENDENCY", "add_dependency", "remove_dependency",
    "get_children", "get_parents", "has_cycle", "topological_sort", "find_descendants",
    "find_ancestors", "register_recompute_fn", "register_passthrough_recompute",
    "PropagationMode", "propagate_change", "queue_recomputation", "schedule_propagation",
    "execute_propagation", "EventType", "subscribe", "unsubscribe",
    # monitoring
    "get_stats", "MMSBStats", "print_stats", "reset_stats", "track_delta_latency",
    "track_propagation_latency",
    # errors
    "MMSBError", "PageNotFoundError", "InvalidDeltaError", "GPUMemoryError",
    "SerializationError", "GraphCycleError", "UnsupportedLocationError",
]

# Public names the engine adds beside SPEC.md's (announced with the implementation).
EXTRA_NAMES = [
    "PageLocation", "PageSnapshot", "Subscription", "set_metadata", "update_metadata",
    "HistoryUnavailableError", "InvalidArgumentError", "MetadataError",
]


def test_all_is_a_list_of_strings() -> None:
    assert isinstance(mmsb.__all__, (list, tuple))
    assert all(isinstance(n, str) for n in mmsb.__all__)


@pytest.mark.parametrize("name", SPEC_NAMES + EXTRA_NAMES)
def test_name_is_exported(name: str) -> None:
    assert name in mmsb.__all__, f"{name} missing from mmsb.__all__"
    assert hasattr(mmsb, name), f"mmsb.{name} is listed but not importable"


def test_each_name_exported_once() -> None:
    seen: dict[str, int] = {}
    for n in mmsb.__all__:
        seen[n] = seen.get(n, 0) + 1
    dupes = sorted(n for n, c in seen.items() if c > 1)
    assert not dupes, f"exported more than once: {dupes}"


def test_every_name_in_all_resolves() -> None:
    missing = [n for n in mmsb.__all__ if not hasattr(mmsb, n)]
    assert not missing, f"in __all__ but not attributes of mmsb: {missing}"


def test_star_import() -> None:
    ns: dict[str, object] = {}
    exec("from mmsb import *", ns)  # noqa: S102 - the point is the star import
    for name in SPEC_NAMES:
        assert name in ns


def test_no_private_names_exported() -> None:
    assert not [n for n in mmsb.__all__ if n.startswith("_")]


def test_dependency_constants_are_edge_types() -> None:
    assert mmsb.DATA_DEPENDENCY == mmsb.EdgeType.DATA
    assert mmsb.CONTROL_DEPENDENCY == mmsb.EdgeType.CONTROL
    assert mmsb.GPU_SYNC_DEPENDENCY == mmsb.EdgeType.GPU_SYNC
    assert mmsb.COMPILER_DEPENDENCY == mmsb.EdgeType.COMPILER


def test_enums_have_spec_members() -> None:
    for member in ("PAGE_CREATED", "PAGE_DELETED", "PAGE_CHANGED", "PAGE_INVALIDATED",
                   "PAGE_STALE", "DELTA_APPLIED", "GPU_SYNC_NEEDED", "GPU_SYNC_COMPLETE",
                   "IR_INVALIDATED"):
        assert hasattr(mmsb.EventType, member), member
    for member in ("IMMEDIATE", "DEFERRED", "BATCH"):
        assert hasattr(mmsb.PropagationMode, member), member
    for member in ("CPU", "GPU", "UNIFIED"):
        assert hasattr(mmsb.PageLocation, member), member


_FRESH_IMPORT = """
import json, sys
import mmsb
first = list(mmsb.__all__)
ns = {}
exec("from mmsb import *", ns)
for name in [m for m in sys.modules if m == "mmsb" or m.startswith("mmsb.")]:
    del sys.modules[name]
import mmsb as again
print(json.dumps({
    "file": mmsb.__file__,
    "all": first,
    "missing": [n for n in first if not hasattr(mmsb, n)],
    "star": sorted(n for n in ns if not n.startswith("__")),
    "again_all": list(again.__all__),
    "again_is_new": again is not mmsb,
}))
"""


@pytest.fixture(scope="module")
def fresh() -> dict[str, Any]:
    """What a new interpreter sees when it imports this checkout's ``mmsb``, imports it
    a second time from scratch, and star-imports it (nothing cached from this process)."""
    src = str(Path(mmsb.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_fresh_import_is_this_checkout(fresh: dict[str, Any]) -> None:
    assert Path(fresh["file"]).resolve() == Path(mmsb.__file__).resolve()


def test_fresh_import_exports_every_spec_name(fresh: dict[str, Any]) -> None:
    assert fresh["missing"] == [], f"in __all__ but not importable: {fresh['missing']}"
    missing = sorted(set(SPEC_NAMES + EXTRA_NAMES) - set(fresh["all"]))
    assert not missing, f"missing from a fresh mmsb.__all__: {missing}"
    assert fresh["all"] == list(mmsb.__all__)
    assert sorted(fresh["all"]) == fresh["star"], "star import differs from __all__"


def test_package_reimport_is_stable(fresh: dict[str, Any]) -> None:
    # the second import really ran the package again, and exported the same names
    assert fresh["again_is_new"]
    assert fresh["again_all"] == fresh["all"]
