"""MMSB — the Memory-Mapped State Bus.

One authoritative, versioned, replayable memory fabric: state lives in byte pages,
changes only through deltas, every delta goes into one transaction log, and any past
state can be rebuilt exactly by replay. See the README and docs/ for the tour.
"""

from __future__ import annotations

from ._api import Batch as Batch
from ._api import active as active
from ._api import active_state as active_state
from ._api import add_dependency as add_dependency
from ._api import apply_batch as apply_batch
from ._api import batch as batch
from ._api import call_events as call_events
from ._api import checkpoint_log as checkpoint_log
from ._api import clear_subscriptions as clear_subscriptions
from ._api import clone_page as clone_page
from ._api import code_differences as code_differences
from ._api import code_pages as code_pages
from ._api import compute_closure as compute_closure
from ._api import compute_log_statistics as compute_log_statistics
from ._api import configure_instrumentation as configure_instrumentation
from ._api import create_debug_subscriber as create_debug_subscriber
from ._api import create_delta as create_delta
from ._api import create_logging_subscriber as create_logging_subscriber
from ._api import create_page as create_page
from ._api import create_pages as create_pages
from ._api import delete_page as delete_page
from ._api import detect_cycles as detect_cycles
from ._api import disable_instrumentation as disable_instrumentation
from ._api import enable_instrumentation as enable_instrumentation
from ._api import ensure_page_on_device as ensure_page_on_device
from ._api import execute_propagation as execute_propagation
from ._api import find_ancestors as find_ancestors
from ._api import find_descendants as find_descendants
from ._api import flush_call_events as flush_call_events
from ._api import get_children as get_children
from ._api import get_deltas_for_page as get_deltas_for_page
from ._api import get_deltas_in_range as get_deltas_in_range
from ._api import get_device_stats as get_device_stats
from ._api import get_parents as get_parents
from ._api import get_stats as get_stats
from ._api import get_subscription_count as get_subscription_count
from ._api import has_cycle as has_cycle
from ._api import instrumentation_config as instrumentation_config
from ._api import is_unified_memory_available as is_unified_memory_available
from ._api import load_checkpoint as load_checkpoint
from ._api import merge_deltas as merge_deltas
from ._api import migrate_page as migrate_page
from ._api import mmsb_start as mmsb_start
from ._api import mmsb_stop as mmsb_stop
from ._api import open_readonly as open_readonly
from ._api import prefetch_to_cpu as prefetch_to_cpu
from ._api import prefetch_to_gpu as prefetch_to_gpu
from ._api import print_stats as print_stats
from ._api import produced_by as produced_by
from ._api import propagate_change as propagate_change
from ._api import query_log as query_log
from ._api import query_page as query_page
from ._api import queue_recomputation as queue_recomputation
from ._api import refresh_code as refresh_code
from ._api import register_passthrough_recompute as register_passthrough_recompute
from ._api import register_recompute_fn as register_recompute_fn
from ._api import remove_dependency as remove_dependency
from ._api import replay_from_checkpoint as replay_from_checkpoint
from ._api import reset_stats as reset_stats
from ._api import resize_page as resize_page
from ._api import reverse_postorder as reverse_postorder
from ._api import route_delta as route_delta
from ._api import schedule_propagation as schedule_propagation
from ._api import serialize_page as serialize_page
from ._api import set_metadata as set_metadata
from ._api import set_preferred_location as set_preferred_location
from ._api import set_read_mostly as set_read_mostly
from ._api import subscribe as subscribe
from ._api import sync_page_to_gpu as sync_page_to_gpu
from ._api import sync_page_to_gpu_async as sync_page_to_gpu_async
from ._api import sync_pages_to_gpu as sync_pages_to_gpu
from ._api import sync_pages_to_gpu_async as sync_pages_to_gpu_async
from ._api import topological_sort as topological_sort
from ._api import track_delta_latency as track_delta_latency
from ._api import track_propagation_latency as track_propagation_latency
from ._api import unsubscribe as unsubscribe
from ._api import update_metadata as update_metadata
from ._api import update_page as update_page
from ._api import verify_state_consistency as verify_state_consistency
from ._api import world_age as world_age
from ._api import write_page as write_page
from ._core.delta import Delta as Delta
from ._core.delta import compress_delta as compress_delta
from ._core.delta import delta_byte_count as delta_byte_count
from ._core.engine import MMSBState as MMSBState
from ._core.engine import Page as Page
from ._core.engine import PageSnapshot as PageSnapshot
from ._core.events import Event as Event
from ._core.events import Subscription as Subscription
from ._core.graph import ShadowPageGraph as ShadowPageGraph
from ._core.monitor import MMSBStats as MMSBStats
from ._history.replay import compress_log as compress_log
from ._history.replay import compute_diff as compute_diff
from ._history.replay import incremental_replay as incremental_replay
from ._history.replay import replay_log as replay_log
from ._history.replay import replay_page_history as replay_page_history
from ._history.replay import replay_to_epoch as replay_to_epoch
from ._history.replay import replay_to_lsn as replay_to_lsn
from ._history.replay import replay_to_timestamp as replay_to_timestamp
from ._history.replay import replay_with_predicate as replay_with_predicate
from ._history.timetravel import read_page_at as read_page_at
from ._instrument.calls import CallEvent as CallEvent
from ._instrument.config import InstrumentationConfig as InstrumentationConfig
from ._instrument.ir import CodeIR as CodeIR
from ._instrument.ir import Instr as Instr
from ._instrument.ir import code_hash as code_hash
from ._instrument.ir import deserialize_ast as deserialize_ast
from ._instrument.ir import deserialize_code_ir as deserialize_code_ir
from ._instrument.ir import serialize_ast as serialize_ast
from ._instrument.ir import serialize_code_ir as serialize_code_ir
from ._instrument.provenance import CodeDifference as CodeDifference
from ._instrument.tracked import TrackedVersion as TrackedVersion
from ._instrument.tracked import field_blame as field_blame
from ._instrument.tracked import page_of as page_of
from ._instrument.tracked import tracked as tracked
from ._instrument.tracked import tracked_history as tracked_history
from ._reader import BusReader as BusReader
from ._reader import ReaderSnapshot as ReaderSnapshot
from ._reader import attach as attach
from ._replication.follower import Follower as Follower
from ._replication.follower import FollowerLag as FollowerLag
from ._replication.follower import follow as follow
from ._storage.codec import deserialize_delta as deserialize_delta
from ._storage.codec import serialize_delta as serialize_delta
from ._storage.feed import deserialize_event as deserialize_event
from ._storage.feed import serialize_event as serialize_event
from ._storage.pagecodec import PageImage as PageImage
from ._storage.pagecodec import deserialize_page as deserialize_page
from .config import MMSBConfig as MMSBConfig
from .errors import BusLockedError as BusLockedError
from .errors import DurabilityError as DurabilityError
from .errors import GPUMemoryError as GPUMemoryError
from .errors import GraphCycleError as GraphCycleError
from .errors import HistoryUnavailableError as HistoryUnavailableError
from .errors import InvalidArgumentError as InvalidArgumentError
from .errors import InvalidDeltaError as InvalidDeltaError
from .errors import MetadataError as MetadataError
from .errors import MissingDependencyError as MissingDependencyError
from .errors import MMSBError as MMSBError
from .errors import NotLeaderError as NotLeaderError
from .errors import PageNotFoundError as PageNotFoundError
from .errors import PropagationError as PropagationError
from .errors import ReplicationError as ReplicationError
from .errors import SerializationError as SerializationError
from .errors import StateClosedError as StateClosedError
from .errors import UnsupportedLocationError as UnsupportedLocationError
from .types import COMPILER_DEPENDENCY as COMPILER_DEPENDENCY
from .types import CONTROL_DEPENDENCY as CONTROL_DEPENDENCY
from .types import DATA_DEPENDENCY as DATA_DEPENDENCY
from .types import GPU_SYNC_DEPENDENCY as GPU_SYNC_DEPENDENCY
from .types import EdgeType as EdgeType
from .types import EventType as EventType
from .types import PageLocation as PageLocation
from .types import PropagationMode as PropagationMode

__version__ = "0.1.0"

__all__ = [
    # lifecycle
    "MMSBConfig", "MMSBState", "mmsb_start", "mmsb_stop", "active", "active_state",
    "open_readonly",
    # pages
    "Page", "PageLocation", "PageSnapshot", "create_page", "create_pages", "update_page",
    "write_page", "query_page", "delete_page", "resize_page", "clone_page", "migrate_page",
    "set_metadata", "update_metadata", "sync_page_to_gpu", "ensure_page_on_device",
    "get_device_stats", "sync_pages_to_gpu", "sync_page_to_gpu_async",
    "sync_pages_to_gpu_async", "prefetch_to_gpu", "prefetch_to_cpu", "set_preferred_location",
    "set_read_mostly", "is_unified_memory_available",
    # deltas
    "Delta", "create_delta", "route_delta", "batch", "Batch", "apply_batch", "merge_deltas",
    "delta_byte_count", "serialize_delta", "deserialize_delta", "compress_delta",
    "serialize_page", "deserialize_page", "PageImage",
    "compute_closure", "detect_cycles", "reverse_postorder", "clear_subscriptions",
    "get_subscription_count", "create_logging_subscriber", "create_debug_subscriber",
    # log, checkpoints, replay
    "query_log", "get_deltas_for_page", "get_deltas_in_range", "compute_log_statistics",
    "compress_log", "checkpoint_log", "load_checkpoint", "replay_to_lsn",
    "replay_to_timestamp", "replay_to_epoch", "replay_log", "replay_page_history",
    "verify_state_consistency", "compute_diff", "incremental_replay", "replay_with_predicate",
    "replay_from_checkpoint", "read_page_at",
    # graph, propagation, events
    "ShadowPageGraph", "EdgeType", "DATA_DEPENDENCY", "CONTROL_DEPENDENCY",
    "GPU_SYNC_DEPENDENCY", "COMPILER_DEPENDENCY", "add_dependency", "remove_dependency",
    "get_children", "get_parents", "has_cycle", "topological_sort", "find_descendants",
    "find_ancestors", "register_recompute_fn", "register_passthrough_recompute",
    "PropagationMode", "propagate_change", "queue_recomputation", "schedule_propagation",
    "execute_propagation", "EventType", "subscribe", "unsubscribe", "Subscription",
    # readers in other processes, the change feed
    "attach", "BusReader", "ReaderSnapshot", "Event", "serialize_event", "deserialize_event",
    # replication through Redis
    "follow", "Follower", "FollowerLag",
    # instrumentation
    "InstrumentationConfig", "enable_instrumentation", "disable_instrumentation",
    "configure_instrumentation", "instrumentation_config", "code_pages", "refresh_code",
    "world_age", "serialize_code_ir", "deserialize_code_ir", "serialize_ast",
    "deserialize_ast", "CodeIR", "Instr", "code_hash", "flush_call_events", "call_events",
    "CallEvent", "tracked", "page_of", "tracked_history", "field_blame", "TrackedVersion",
    "produced_by", "code_differences", "CodeDifference",
    # monitoring
    "MMSBStats", "get_stats", "print_stats", "reset_stats", "track_delta_latency",
    "track_propagation_latency",
    # errors
    "MMSBError", "PageNotFoundError", "InvalidDeltaError", "GPUMemoryError",
    "SerializationError", "GraphCycleError", "UnsupportedLocationError",
    "InvalidArgumentError", "MetadataError", "HistoryUnavailableError", "StateClosedError",
    "BusLockedError", "DurabilityError", "MissingDependencyError",
    "PropagationError", "ReplicationError", "NotLeaderError",
]
