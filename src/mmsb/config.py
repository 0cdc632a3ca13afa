"""Configuration of a state: :class:`MMSBConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidArgumentError
from .types import PropagationMode

__all__ = ["MMSBConfig"]

_FSYNC = ("always", "batch", "none")
_RECOVERY = ("tolerate_tail", "strict", "point_in_time")

# Valid ranges of the numeric fields: (low, high), both inclusive. The page size bound is
# the engine's largest page (sparse positions are 32-bit).
_INT_RANGES = {
    "page_size_default": (1, (1 << 32) - 1),
    "max_tlog_size": (1, 1 << 62),
    "segment_bytes": (1, 1 << 40),
}
_FLOAT_RANGES = {
    "checkpoint_interval": (0.0, 365 * 86400.0),
    "fsync_batch_ms": (0.0, 60_000.0),
    "ack_timeout": (0.001, 86400.0),
    "replication_lease": (0.2, 3600.0),
}
_BOOL_FIELDS = ("enable_logging", "enable_gpu", "restore_device_pages_on_cpu",
                "enable_instrumentation")
_REPLICATE_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_ACK_REPLICAS = 64
MAX_URL = 4096
MAX_RETAIN_CHECKPOINTS = 1 << 20


@dataclass(slots=True)
class MMSBConfig:
    """Settings of one state. Unknown values are refused when a state is built."""

    enable_logging: bool = True
    """Keep the transaction log. Off: writes still get LSNs, but nothing is retained,
    so replay, history and verification raise HistoryUnavailableError."""
    enable_gpu: bool = True
    """Allow GPU and unified pages when a CUDA device is usable."""
    restore_device_pages_on_cpu: bool = False
    """When a checkpoint holding gpu or unified pages is loaded where that location is
    not usable: False (the default) refuses the load with GPUMemoryError, changing
    nothing; True loads it and moves those pages to the cpu, each move logged as a
    PageMigrate (so replay and verification agree with the state)."""
    enable_instrumentation: bool = False
    """``mmsb_start`` enables the instrumentation layer (code artefacts, call events and
    provenance on pages) with the default InstrumentationConfig."""
    page_size_default: int = 4096
    """Size of a page created without a size (1 to 2**32 - 1)."""
    max_tlog_size: int = 10_000
    """Most deltas an in-memory log retains: past seven eighths of it, compaction folds the
    oldest records into the replay base over the next calls (for a durable bus, records
    before an automatic checkpoint). 1 to 2**62."""
    checkpoint_interval: float = 60
    """Seconds between automatic checkpoints of a durable bus (0: never by time); finite,
    at most one year."""
    propagation_mode: PropagationMode = PropagationMode.IMMEDIATE
    """When writes reach dependent pages."""
    fsync: str = "batch"
    """Durable bus only: "always", "batch" (group commit) or "none"."""
    fsync_batch_ms: float = 5.0
    """Durable bus, fsync="batch": most milliseconds between group commits; finite, 0 to
    60,000 (below 0.1 the group-commit thread waits 0.1 ms)."""
    recovery: str = "tolerate_tail"
    """Durable bus only: "tolerate_tail", "strict" or "point_in_time"."""
    retain_checkpoints: int | None = None
    """Durable bus only: checkpoints (and the log between them) kept, 1 to 2**20; None
    keeps all."""
    segment_bytes: int = 64 << 20
    """Durable bus only: size at which a log segment file is closed and a new one begun
    (1 to 2**40 bytes)."""
    replicate_to: str | None = None
    """Durable bus only: a Redis URL (``redis://HOST:PORT/DB``, ``rediss://``, ``unix://``)
    to publish the log to, as the leader of its followers (see docs/Replication.md).
    Needs the ``replicate`` extra (redis-py)."""
    ack: str = "local"
    """With ``replicate_to``: when a changing call returns. ``"local"``: once it is in the
    leader's log (as ``fsync`` says); ``"replicas:N"``: once N followers have applied it
    and made it durable (1 to 64)."""
    ack_timeout: float = 10.0
    """Seconds a call waits for its ``replicas:N`` acknowledgements before it raises
    DurabilityError (the write stays in the log); 0.001 to 86,400."""
    replication_lease: float = 5.0
    """Seconds the leader's lease in Redis lasts unless renewed (it is renewed every
    third of that); a follower may take over only after it has lapsed. 0.2 to 3,600."""

    def validate(self) -> None:
        """Check every field's type and range.

        Raises:
            InvalidArgumentError: naming the first bad field, its value and what it
                accepts (numbers must be finite and inside the field's range).
        """
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"MMSBConfig.{name} must be True or False, not {value!r}")
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidArgumentError(
                    f"MMSBConfig.{name} must be an int from {lo} to {hi}, not {value!r}")
        for name, (flo, fhi) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or not flo <= value <= fhi):
                raise InvalidArgumentError(
                    f"MMSBConfig.{name} must be a finite number from {flo:g} to {fhi:g}, "
                    f"not {value!r}")
        try:
            if type(self.propagation_mode) is not PropagationMode:  # (a member: as it is)
                self.propagation_mode = PropagationMode(self.propagation_mode)
        except (ValueError, TypeError):
            raise InvalidArgumentError(
                f"MMSBConfig.propagation_mode must be a PropagationMode, not {self.propagation_mode!r}") from None
        if not isinstance(self.fsync, str) or self.fsync not in _FSYNC:
            raise InvalidArgumentError(f"MMSBConfig.fsync must be one of {_FSYNC}, not {self.fsync!r}")
        if not isinstance(self.recovery, str) or self.recovery not in _RECOVERY:
            raise InvalidArgumentError(f"MMSBConfig.recovery must be one of {_RECOVERY}, not {self.recovery!r}")
        rc = self.retain_checkpoints
        if rc is not None and (isinstance(rc, bool) or not isinstance(rc, int)
                               or not 1 <= rc <= MAX_RETAIN_CHECKPOINTS):
            raise InvalidArgumentError(
                f"MMSBConfig.retain_checkpoints must be None or an int from 1 to "
                f"{MAX_RETAIN_CHECKPOINTS}, not {rc!r}")
        url = self.replicate_to
        if url is not None and (not isinstance(url, str)
                                or not url.startswith(_REPLICATE_SCHEMES)
                                or len(url.encode("utf-8", "replace")) > MAX_URL):
            raise InvalidArgumentError(
                f"MMSBConfig.replicate_to must be None or a Redis URL (at most {MAX_URL} "
                f"bytes) starting with one of {_REPLICATE_SCHEMES}, not {url!r}")
        replicas_needed(self.ack)


def replicas_needed(ack: object) -> int:
    """The followers an ``ack`` setting waits for: 0 for ``"local"``, N for
    ``"replicas:N"``.

    Raises:
        InvalidArgumentError: any other value.
    """
    if ack == "local":
        return 0
    if isinstance(ack, str) and ack.startswith("replicas:"):
        digits = ack[len("replicas:"):]
        if digits.isdigit() and digits.isascii() and 1 <= int(digits) <= MAX_ACK_REPLICAS:
            return int(digits)
    raise InvalidArgumentError(
        f'MMSBConfig.ack must be "local" or "replicas:N" with N from 1 to {MAX_ACK_REPLICAS}, '
        f"not {ack!r}")
