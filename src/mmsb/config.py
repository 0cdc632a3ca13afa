"""Configuration of a state: :class:`MMSBConfig`."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import InvalidArgumentError
from .types import PropagationMode

__all__ = ["MMSBConfig"]

_FSYNC = ("always", "batch", "none")
_RECOVERY = ("tolerate_tail", "strict", "point_in_time")


@dataclass(slots=True)
class MMSBConfig:
    """Settings of one state. Unknown values are refused when a state is built."""

    enable_logging: bool = True
    """Keep the transaction log. Off: writes still get LSNs, but nothing is retained,
    so replay, history and verification raise HistoryUnavailableError."""
    enable_gpu: bool = True
    """Allow GPU and unified pages when a CUDA device is usable."""
    enable_instrumentation: bool = False
    """Reserved for the instrumentation layer (code artifacts and call events on pages),
    which is not part of this release: the flag is kept, and nothing acts on it yet."""
    page_size_default: int = 4096
    """Size of a page created without a size."""
    max_tlog_size: int = 10_000
    """Deltas retained before compress_log() runs by itself (and, for a durable bus,
    records before an automatic checkpoint)."""
    checkpoint_interval: float = 60
    """Seconds between automatic checkpoints of a durable bus (0: never by time)."""
    propagation_mode: PropagationMode = PropagationMode.IMMEDIATE
    """When writes reach dependent pages."""
    fsync: str = "batch"
    """Durable bus only: "always", "batch" (group commit) or "none"."""
    fsync_batch_ms: float = 5.0
    """Durable bus, fsync="batch": most milliseconds between group commits."""
    recovery: str = "tolerate_tail"
    """Durable bus only: "tolerate_tail", "strict" or "point_in_time"."""
    retain_checkpoints: int | None = None
    """Durable bus only: checkpoints (and the log between them) kept; None keeps all."""
    segment_bytes: int = 64 << 20
    """Durable bus only: size at which a log segment file is closed and a new one begun."""

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("enable_logging", "enable_gpu", "enable_instrumentation"):
                if not isinstance(value, bool):
                    raise InvalidArgumentError(f"MMSBConfig.{f.name} must be True or False, not {value!r}")
        for name in ("page_size_default", "max_tlog_size", "segment_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"MMSBConfig.{name} must be a positive int, not {value!r}")
        for name in ("checkpoint_interval", "fsync_batch_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidArgumentError(f"MMSBConfig.{name} must be a number ≥ 0, not {value!r}")
        try:
            self.propagation_mode = PropagationMode(self.propagation_mode)
        except ValueError:
            raise InvalidArgumentError(
                f"MMSBConfig.propagation_mode must be a PropagationMode, not {self.propagation_mode!r}") from None
        if self.fsync not in _FSYNC:
            raise InvalidArgumentError(f"MMSBConfig.fsync must be one of {_FSYNC}, not {self.fsync!r}")
        if self.recovery not in _RECOVERY:
            raise InvalidArgumentError(f"MMSBConfig.recovery must be one of {_RECOVERY}, not {self.recovery!r}")
        rc = self.retain_checkpoints
        if rc is not None and (isinstance(rc, bool) or not isinstance(rc, int) or rc < 1):
            raise InvalidArgumentError(f"MMSBConfig.retain_checkpoints must be None or an int ≥ 1, not {rc!r}")
