"""MMSB — the Memory-Mapped State Bus.

One authoritative, versioned, replayable memory fabric: state lives in byte pages,
changes only through deltas, every delta goes into one transaction log, and any past
state can be rebuilt exactly by replay. See the README and docs/ for the tour.
"""

from __future__ import annotations

from .api import Batch as Batch
from .api import active as active
from .api import active_state as active_state
from .api import add_dependency as add_dependency
from .api import apply_batch as apply_batch
from .api import batch as batch
from .api import checkpoint_log as checkpoint_log
from .api import clear_subscriptions as clear_subscriptions
from .api import clone_page as clone_page
from .api import compute_closure as compute_closure
from .api import compute_log_statistics as compute_log_statistics
from .api import create_debug_subscriber as create_debug_subscriber
from .api import create_delta as create_delta
from .api import create_logging_subscriber as create_logging_subscriber
from .api import create_page as create_page
from .api import create_pages as create_pages
from .api import delete_page as delete_page
from .api import detect_cycles as detect_cycles
from .api import execute_propagation as execute_propagation
from .api import find_ancestors as find_ancestors
from .api import find_descendants as find_descendants
from .api import get_children as get_children
from .api import get_deltas_for_page as get_deltas_for_page
from .api import get_deltas_in_range as get_deltas_in_range
from .api import get_parents as get_parents
from .api import get_stats as get_stats
from .api import get_subscription_count as get_subscription_count
from .api import has_cycle as has_cycle
from .api import load_checkpoint as load_checkpoint
from .api import merge_deltas as merge_deltas
from .api import migrate_page as migrate_page
from .api import mmsb_start as mmsb_start
from .api import mmsb_stop as mmsb_stop
from .api import print_stats as print_stats
from .api import propagate_change as propagate_change
from .api import query_log as query_log
from .api import query_page as query_page
from .api import queue_recomputation as queue_recomputation
from .api import register_passthrough_recompute as register_passthrough_recompute
from .api import register_recompute_fn as register_recompute_fn
from .api import remove_dependency as remove_dependency
from .api import replay_from_checkpoint as replay_from_checkpoint
from .api import reset_stats as reset_stats
from .api import resize_page as resize_page
from .api import reverse_postorder as reverse_postorder
from .api import route_delta as route_delta
from .api import schedule_propagation as schedule_propagation
from .api import serialize_page as serialize_page
from .api import set_metadata as set_metadata
from .api import subscribe as subscribe
from .api import topological_sort as topological_sort
from .api import track_delta_latency as track_delta_latency
from .api import track_propagation_latency as track_propagation_latency
from .api import unsubscribe as unsubscribe
from .api import update_metadata as update_metadata
from .api import update_page as update_page
from .api import write_page as write_page
from .config import MMSBConfig as MMSBConfig
from .delta import Delta as Delta
from .delta import compress_delta as compress_delta
from .delta import delta_byte_count as delta_byte_count
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
from .errors import PageNotFoundError as PageNotFoundError
from .errors import PropagationError as PropagationError
from .errors import SerializationError as SerializationError
from .errors import StateClosedError as StateClosedError
from .errors import UnsupportedLocationError as UnsupportedLocationError
from .events import Subscription as Subscription
from .graph import ShadowPageGraph as ShadowPageGraph
from .log.bus import open_readonly as open_readonly
from .log.codec import deserialize_delta as deserialize_delta
from .log.codec import serialize_delta as serialize_delta
from .log.pagecodec import PageImage as PageImage
from .log.pagecodec import deserialize_page as deserialize_page
from .monitor import MMSBStats as MMSBStats
from .replay import compress_log as compress_log
from .replay import compute_diff as compute_diff
from .replay import incremental_replay as incremental_replay
from .replay import replay_log as replay_log
from .replay import replay_page_history as replay_page_history
from .replay import replay_to_epoch as replay_to_epoch
from .replay import replay_to_lsn as replay_to_lsn
from .replay import replay_to_timestamp as replay_to_timestamp
from .replay import replay_with_predicate as replay_with_predicate
from .replay import verify_state_consistency as verify_state_consistency
from .state import MMSBState as MMSBState
from .state import Page as Page
from .state import PageSnapshot as PageSnapshot
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
    "set_metadata", "update_metadata",
    # deltas
    "Delta", "create_delta", "route_delta", "batch", "Batch", "apply_batch", "merge_deltas",
    "delta_byte_count", "serialize_delta", "deserialize_delta", "compress_delta",
    "serialize_page", "deserialize_page", "PageImage",
    # log, checkpoints, replay
    "query_log", "get_deltas_for_page", "get_deltas_in_range", "compute_log_statistics",
    "compress_log", "checkpoint_log", "load_checkpoint", "replay_to_lsn",
    "replay_to_timestamp", "replay_to_epoch", "replay_log", "replay_page_history",
    "verify_state_consistency", "compute_diff", "incremental_replay", "replay_with_predicate",
    "replay_from_checkpoint",
    # graph, propagation, events
    "ShadowPageGraph", "EdgeType", "DATA_DEPENDENCY", "CONTROL_DEPENDENCY",
    "GPU_SYNC_DEPENDENCY", "COMPILER_DEPENDENCY", "add_dependency", "remove_dependency",
    "get_children", "get_parents", "has_cycle", "topological_sort", "find_descendants",
    "find_ancestors", "register_recompute_fn", "register_passthrough_recompute",
    "PropagationMode", "propagate_change", "queue_recomputation", "schedule_propagation",
    "execute_propagation", "EventType", "subscribe", "unsubscribe", "Subscription",
    "compute_closure", "detect_cycles", "reverse_postorder", "clear_subscriptions",
    "get_subscription_count", "create_logging_subscriber", "create_debug_subscriber",
    # monitoring
    "MMSBStats", "get_stats", "print_stats", "reset_stats", "track_delta_latency",
    "track_propagation_latency",
    # errors
    "MMSBError", "PageNotFoundError", "InvalidDeltaError", "GPUMemoryError",
    "SerializationError", "GraphCycleError", "UnsupportedLocationError",
    "InvalidArgumentError", "MetadataError", "HistoryUnavailableError", "StateClosedError",
    "BusLockedError", "DurabilityError", "MissingDependencyError",
    "PropagationError",
]
