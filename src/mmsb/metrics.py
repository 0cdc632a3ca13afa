"""Prometheus exposition of a state's statistics (the optional extra ``mmsb[metrics]``).

Register a collector with any ``prometheus_client`` registry::

    from prometheus_client import REGISTRY
    from mmsb.metrics import MMSBCollector

    REGISTRY.register(MMSBCollector(state))

or serve one state (or a function that returns the state to report, called on each
scrape) on its own port with :func:`serve_metrics`. ``mmsb metrics PATH --port N`` does
that for a durable bus, reopening it read-only when its files change.

Every value comes from :func:`mmsb.get_stats` at scrape time. Sizes (pages, bytes, log,
graph, arena) are gauges; activity since the last ``reset_stats`` (records, events,
handler errors, torn tails, operation counts and time) are counters; latency
percentiles of the retained samples are gauges labelled ``operation`` and ``quantile``.
Latencies are kept by the process that writes, so only a collector registered in that
process sees them; a bus opened read-only reports its size, not the writer's activity.

``prometheus_client`` is imported only when a collector runs; without it the calls
here raise :class:`~mmsb.errors.MMSBError` naming the extra to install.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError, MissingDependencyError, MMSBError

if TYPE_CHECKING:
    from ._core.engine import MMSBState
    from ._core.monitor import MMSBStats

__all__ = [
    "MMSBCollector",
    "BusFilesCollector",
    "MetricsServer",
    "serve_metrics",
    "render_metrics",
    "require_prometheus_client",
]

log = logging.getLogger("mmsb.metrics")

# Timed operations: each has ``<op>_count`` in MMSBStats, and where present
# ``<op>_total_ns``, ``<op>_p50_ns`` / ``_p90_ns`` / ``_p99_ns`` and ``<op>_max_ns``.
_OPERATIONS = ("delta_apply", "propagation", "log_append", "checkpoint")
_Q_FIELD = {"0.5": "p50", "0.9": "p90", "0.99": "p99"}


def require_prometheus_client() -> Any:
    """Import and return ``prometheus_client``.

    Raises:
        MissingDependencyError: it is not installed (the message says how to install it).
    """
    try:
        import prometheus_client
    except ImportError:
        raise MissingDependencyError(
            "Prometheus metrics need the prometheus_client package, which is not installed; "
            "install the extra: pip install 'mmsb[metrics]'") from None
    return prometheus_client


def _state_factory(source: Any, what: str) -> Callable[[], MMSBState]:
    from ._core.engine import MMSBState

    if isinstance(source, MMSBState):
        return lambda: source
    if callable(source):
        return source
    raise InvalidArgumentError(
        f"{what} takes an MMSBState or a function returning one, not {type(source).__name__}")


@dataclass(frozen=True, slots=True)
class _Family:
    """One metric family: its name (without namespace), type and help text."""

    name: str
    kind: str
    """"gauge" or "counter"."""
    doc: str
    labels: tuple[str, ...] = ()
    activity: bool = False
    """Counts or times what this process did (not kept on disk), rather than a size."""


_FAMILIES: tuple[_Family, ...] = (
    _Family("up", "gauge", "1 when the state could be read for this scrape, else 0."),
    _Family("pages", "gauge", "Live pages, by location.", ("location",)),
    _Family("page_bytes", "gauge", "Sum of the live pages' sizes, in bytes."),
    _Family("deltas", "gauge", "Deltas retained in the transaction log."),
    _Family("delta_bytes", "gauge", "Bytes the retained deltas write (changed bytes)."),
    _Family("log_records", "gauge", "Records of every kind retained in the log."),
    _Family("log_payload_bytes", "gauge", "Payload memory of the retained deltas, in bytes."),
    _Family("last_lsn", "gauge", "LSN of the newest log record."),
    _Family("graph_nodes", "gauge", "Pages with at least one dependency edge."),
    _Family("graph_edges", "gauge", "Dependency edges."),
    _Family("graph_max_depth", "gauge", "Longest path of the dependency graph, in edges."),
    _Family("arena_bytes", "gauge",
            "Arena bytes: in_use (live page slots), free (free lists), reserved (virtual).",
            ("state",)),
    _Family("arena_fragmentation_ratio", "gauge",
            "Share of carved arena bytes not holding page bytes."),
    _Family("records_logged", "counter", "Records appended to the log since the last reset.",
            activity=True),
    _Family("payload_bytes_logged", "counter",
            "Delta payload bytes appended to the log since the last reset.", activity=True),
    _Family("events_emitted", "counter", "Events delivered since the last reset.", activity=True),
    _Family("handler_errors", "counter", "Event handlers that raised since the last reset.", activity=True),
    _Family("torn_tails_recovered", "counter", "Torn log tails cut off by recovery.", activity=True),
    _Family("operations", "counter", "Operations timed since the last reset.", ("operation",),
            activity=True),
    _Family("operation_seconds", "counter",
            "Time spent in the operation since the last reset, in seconds.", ("operation",),
            activity=True),
    _Family("operation_latency_seconds", "gauge",
            "Latency percentiles over the retained samples (the last 4096), in seconds.",
            ("operation", "quantile"), activity=True),
    _Family("operation_latency_max_seconds", "gauge",
            "Slowest operation since the last reset, in seconds.", ("operation",),
            activity=True),
)


class MMSBCollector:
    """A ``prometheus_client`` collector for one state: register it with a registry.

    Args:
        state: the state to report, or a function returning it, called on each scrape
            (so a collector can follow a bus reopened read-only as it grows).
        namespace: prefix of every metric name (``mmsb_pages`` …).
        const_labels: labels added to every sample (``{"bus": "orders"}``).
        activity: also report what the process did since the last ``reset_stats``
            (records logged, events, handler errors, torn tails, operation counts, time
            and latency). Leave it out for a state rebuilt from files, where those
            counters describe only the rebuild.

    A scrape calls :func:`mmsb.get_stats` once (O(pages + retained deltas)). If the
    state cannot be read (a damaged bus, say), the scrape reports ``mmsb_up 0`` and
    nothing else, and the error is logged.
    """

    def __init__(self, state: Any, *, namespace: str = "mmsb",
                 const_labels: dict[str, str] | None = None, activity: bool = True) -> None:
        self._factory = _state_factory(state, "MMSBCollector")
        if not isinstance(namespace, str) or not namespace.replace("_", "").isalnum():
            raise InvalidArgumentError(f"namespace must be letters, digits and _, not {namespace!r}")
        labels = dict(const_labels or {})
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidArgumentError("const_labels must map str to str")
        self.namespace = namespace
        self.const_labels = labels
        self._families = tuple(f for f in _FAMILIES if activity or not f.activity)
        self.activity = bool(activity)

    def _name(self, fam: _Family) -> str:
        return f"{self.namespace}_{fam.name}"

    def _new(self, fam: _Family) -> Any:
        require_prometheus_client()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
        return cls(self._name(fam), fam.doc, labels=[*self.const_labels, *fam.labels])

    def describe(self) -> list[Any]:
        """The metric families without samples (lets a registry check names without
        reading the state)."""
        return [self._new(f) for f in self._families]

    def collect(self) -> Iterator[Any]:
        """Yield the metric families of one ``get_stats`` snapshot."""
        from ._api import get_stats

        fams = {f.name: self._new(f) for f in self._families}
        const = list(self.const_labels.values())
        try:
            stats = get_stats(self._factory())
        except (MMSBError, OSError) as exc:
            log.error("metrics scrape could not read the state: %s", exc)
            fams["up"].add_metric(const, 0)
            yield fams["up"]
            return
        fams["up"].add_metric(const, 1)
        self._fill(fams, stats, const)
        yield from fams.values()

    def _fill(self, fams: dict[str, Any], s: MMSBStats, const: list[str]) -> None:
        def put(name: str, value: float, *labels: str) -> None:
            fams[name].add_metric([*const, *labels], value)

        put("pages", s.cpu_pages, "cpu")
        put("pages", s.gpu_pages, "gpu")
        put("pages", s.unified_pages, "unified")
        put("page_bytes", s.total_page_bytes)
        put("deltas", s.total_deltas)
        put("delta_bytes", s.total_delta_bytes)
        put("log_records", s.log_records)
        put("log_payload_bytes", s.log_bytes)
        put("last_lsn", s.last_lsn)
        put("graph_nodes", s.graph_nodes)
        put("graph_edges", s.graph_edges)
        put("graph_max_depth", s.graph_max_depth)
        put("arena_bytes", s.arena_bytes_in_use, "in_use")
        put("arena_bytes", s.arena_bytes_free, "free")
        put("arena_bytes", s.arena_bytes_reserved, "reserved")
        put("arena_fragmentation_ratio", s.arena_fragmentation)
        if not self.activity:
            return
        put("records_logged", s.records_logged)
        put("events_emitted", s.events_emitted)
        put("handler_errors", s.handler_errors)
        put("torn_tails_recovered", s.torn_tails_recovered)
        put("payload_bytes_logged", s.payload_bytes_logged)
        for op in _OPERATIONS:
            put("operations", getattr(s, f"{op}_count"), op)
            total = getattr(s, f"{op}_total_ns", None)
            if total is not None:
                put("operation_seconds", total / 1e9, op)
            for q, suffix in _Q_FIELD.items():
                value = getattr(s, f"{op}_{suffix}_ns", None)
                if value is not None:
                    put("operation_latency_seconds", value / 1e9, op, q)
            worst = getattr(s, f"{op}_max_ns", None)
            if worst is not None:
                put("operation_latency_max_seconds", worst / 1e9, op)


class BusFilesCollector:
    """Disk use of a durable bus directory: checkpoint files and log segments, by
    count and bytes (the checkpoints' bytes include their page store,
    ``checkpoints/pages``). Only ``stat`` calls: nothing is read or written. O(files)."""

    def __init__(self, path: str | os.PathLike[str], *, namespace: str = "mmsb",
                 const_labels: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.namespace = namespace
        self.const_labels = dict(const_labels or {})

    def _families(self) -> dict[str, Any]:
        require_prometheus_client()
        from prometheus_client.core import GaugeMetricFamily

        labels = [*self.const_labels]
        ns = self.namespace
        return {
            "checkpoints": GaugeMetricFamily(f"{ns}_bus_checkpoint_files",
                                             "Checkpoint files of the bus.", labels=labels),
            "checkpoint_bytes": GaugeMetricFamily(f"{ns}_bus_checkpoint_bytes",
                                                  "Bytes of the bus's checkpoint files and their "
                                                  "page store.", labels=labels),
            "wal": GaugeMetricFamily(f"{ns}_bus_wal_segments",
                                     "Write-ahead log segment files of the bus.", labels=labels),
            "wal_bytes": GaugeMetricFamily(f"{ns}_bus_wal_bytes",
                                           "Bytes of the bus's log segment files (space written ahead "
                                           "of the frames included).", labels=labels),
        }

    def describe(self) -> list[Any]:
        return list(self._families().values())

    def collect(self) -> Iterator[Any]:
        from ._storage.bus import bus_files
        from ._storage.pagestore import STORE_NAME

        fams = self._families()
        const = list(self.const_labels.values())
        files = bus_files(self.path)
        for kind, count_name, bytes_name in (("checkpoints", "checkpoints", "checkpoint_bytes"),
                                             ("wal", "wal", "wal_bytes")):
            sizes = []
            for p in files[kind]:
                try:
                    sizes.append(p.stat().st_size)
                except FileNotFoundError:  # dropped by the writer while we looked
                    continue
            fams[count_name].add_metric(const, len(sizes))
            if kind == "checkpoints":
                try:
                    sizes.append((self.path / "checkpoints" / STORE_NAME).stat().st_size)
                except FileNotFoundError:  # no checkpoint keeps its pages there yet
                    pass
            fams[bytes_name].add_metric(const, sum(sizes))
        yield from fams.values()


class MetricsServer:
    """A running exposition endpoint (see :func:`serve_metrics`)."""

    def __init__(self, server: Any, thread: threading.Thread, registry: Any) -> None:
        self._server = server
        self.thread = thread
        self.registry = registry
        """The ``CollectorRegistry`` it serves."""

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _registry(state: Any, bus_path: str | os.PathLike[str] | None,
              const_labels: dict[str, str] | None, activity: bool) -> Any:
    pc = require_prometheus_client()
    registry = pc.CollectorRegistry()
    registry.register(MMSBCollector(state, const_labels=const_labels, activity=activity))
    if bus_path is not None:
        registry.register(BusFilesCollector(bus_path, const_labels=const_labels))
    return registry


def serve_metrics(state: Any, port: int, host: str = "127.0.0.1", *,
                  bus_path: str | os.PathLike[str] | None = None,
                  const_labels: dict[str, str] | None = None,
                  activity: bool = True) -> MetricsServer:
    """Serve the Prometheus exposition of ``state`` (or of what a function returns on
    each scrape) at ``http://host:port/metrics``, from a daemon thread, with its own
    registry. ``port=0`` picks a free port (see ``.port``). With ``bus_path``, the
    bus directory's disk use is reported too; ``activity`` as for MMSBCollector.

    Raises:
        MMSBError: prometheus_client is missing, or the port cannot be bound.
        InvalidArgumentError: ``state`` is neither a state nor callable; bad port.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be an int in 0 … 65535, not {port!r}")
    pc = require_prometheus_client()
    registry = _registry(state, bus_path, const_labels, activity)
    try:
        server, thread = pc.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MMSBError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(server, thread, registry)


def render_metrics(state: Any, *, bus_path: str | os.PathLike[str] | None = None,
                   const_labels: dict[str, str] | None = None, activity: bool = True) -> str:
    """The exposition text a scrape of :func:`serve_metrics` would return, once."""
    pc = require_prometheus_client()
    registry = _registry(state, bus_path, const_labels, activity)
    return str(pc.generate_latest(registry).decode("utf-8"))
