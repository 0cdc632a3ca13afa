"""``@tracked`` classes: an instance gets a page, each attribute write is a logged delta.

An instance created while a state is active (``mmsb_start`` or ``with active(state)``)
whose instrumentation is enabled with ``attributes=True`` gets a page holding its
tracked attributes as a msgpack map (layout in docs/SerializationSpec.md, "Tracked
objects"). Every later ``obj.x = v`` or ``del obj.x`` rewrites the map: the page's
update logs only the bytes that changed, with source ``attr:Class.x``. The page's
history is then the object's field history: :func:`tracked_history` decodes each
version, :func:`field_blame` says which write set each field.
"""

from __future__ import annotations

import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .._core.engine import ACTIVE
from .._history.replay import replay_page_history
from ..errors import InvalidArgumentError, SerializationError
from .manager import LISTENERS, attributes_wanted, manager_of

if TYPE_CHECKING:
    from .._core.engine import MMSBState

__all__ = ["tracked", "page_of", "tracked_history", "field_blame", "decode_tracked",
           "TrackedVersion", "TRACKED_MAGIC", "TRACKED_META"]

TRACKED_MAGIC = b"MTRK"
TRACKED_VERSION = 1
_HEADER = struct.Struct("<4sHHI")
"""magic, version, flags (0), body length."""
TRACKED_META = "tracked"
"""Metadata key of a tracked object's page: {"class": "module.Qualname"}."""
_BINDING = "__mmsb_tracked__"
_MIN_PAGE = 64
_MAX_BODY = 16 << 20


class _Binding:
    __slots__ = ("state", "page", "cls_name")

    def __init__(self, state: MMSBState, page: int, cls_name: str) -> None:
        self.state = weakref.ref(state)
        self.page = page
        self.cls_name = cls_name


def _tracked_names(obj: Any) -> tuple[str, ...] | None:
    return getattr(type(obj), "__mmsb_tracked_fields__", None)


def _is_tracked(obj: Any, name: str) -> bool:
    names = _tracked_names(obj)
    if names is not None:
        return name in names
    return not name.startswith("_")


def _fields(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if k != _BINDING and _is_tracked(obj, k)}


def _encode(fields: dict[str, Any], cls_name: str) -> bytes:
    try:
        body = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"a tracked {cls_name} holds a value msgpack cannot encode ({exc}); tracked "
            "attributes take None, bool, int, float, str, bytes, and lists, tuples or dicts "
            "of those (or leave the attribute untracked: @tracked(fields=...) or a name "
            "starting with '_')") from None
    if len(body) > _MAX_BODY:
        raise InvalidArgumentError(
            f"a tracked {cls_name}'s attributes encode to {len(body)} bytes, over the limit "
            f"of {_MAX_BODY}")
    return _HEADER.pack(TRACKED_MAGIC, TRACKED_VERSION, 0, len(body)) + body


def decode_tracked(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The attributes a tracked object's page bytes hold.

    Raises:
        SerializationError: the bytes are not a tracked object's page.
    """
    raw = bytes(data)
    if len(raw) < _HEADER.size:
        raise SerializationError("tracked object: shorter than its header")
    magic, version, flags, length = _HEADER.unpack_from(raw)
    if magic != TRACKED_MAGIC or version != TRACKED_VERSION or flags:
        raise SerializationError(f"tracked object: bad header {magic!r} v{version}")
    if length > len(raw) - _HEADER.size:
        raise SerializationError("tracked object: body runs past the page")
    try:
        out = msgpack.unpackb(raw[_HEADER.size:_HEADER.size + length], raw=False,
                              strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SerializationError(f"tracked object: body is not msgpack ({exc})") from None
    if not isinstance(out, dict):
        raise SerializationError("tracked object: body is not a map")
    return out


def _page_size(need: int) -> int:
    size = _MIN_PAGE
    while size < 2 * need:
        size *= 2
    return size


def _store(st: MMSBState, b: _Binding, blob: bytes, source: str) -> None:
    mgr = manager_of(st)
    assert mgr is not None
    ops = mgr.ops
    size = int(st.pages[b.page].size)
    if len(blob) > size:
        ops.resize_page(st, b.page, _page_size(len(blob)))
        size = int(st.pages[b.page].size)
    ops.update_page(st, b.page, blob + bytes(size - len(blob)), source=source)


def _live_binding(obj: Any) -> tuple[_Binding, MMSBState] | None:
    b = vars(obj).get(_BINDING)
    if b is None:
        return None
    st = b.state()
    if st is None or st.closed:
        return None
    mgr = manager_of(st)
    if mgr is None or not mgr.config.attributes:
        return None
    return b, st


def _bind(obj: Any, cls_name: str) -> None:
    st = ACTIVE.get()
    if st is None or st.closed:
        return
    mgr = manager_of(st)
    if mgr is None or not mgr.config.attributes:
        return
    if st.batch_frame is not None or st.recomputing is not None:
        mgr._note(f"a {cls_name} made inside a batch or a recompute function is not tracked "
                  "(its page cannot be created there)")
        return
    blob = _encode(_fields(obj), cls_name)
    page = mgr.ops.create_page(st, _page_size(len(blob)),
                               metadata={TRACKED_META: {"class": cls_name}})
    b = _Binding(st, page.id, cls_name)
    vars(obj)[_BINDING] = b
    try:
        _store(st, b, blob, f"init:{cls_name.rsplit('.', 1)[-1]}")
    except BaseException:
        del vars(obj)[_BINDING]
        raise


_MISSING = object()


def tracked(cls: type | None = None, *, fields: tuple[str, ...] | list[str] | None = None
            ) -> Any:
    """Class decorator: instances made while a state with instrumentation (and
    ``attributes=True``) is active get a page, and each write or deletion of a tracked
    attribute is a logged delta on it (source ``attr:Class.name``).

    ``fields``: the attribute names to track (default: every name not starting with
    ``_``). Values must be msgpack-encodable (None, bool, int, float, str, bytes, lists,
    tuples and dicts of those; tuples read back as lists). A write of anything else is
    refused with :class:`~mmsb.InvalidArgumentError` and the attribute keeps its value.

    Raises:
        InvalidArgumentError: not a class, instances without ``__dict__``, bad ``fields``.
    """
    if fields is not None:
        if (isinstance(fields, str) or not isinstance(fields, Iterable)
                or not all(isinstance(f, str) for f in fields)):
            raise InvalidArgumentError("tracked(fields=...) takes a list of attribute names, "
                                       f"not {fields!r}")
        names: tuple[str, ...] | None = tuple(fields)
    else:
        names = None

    def decorate(klass: type) -> type:
        if not isinstance(klass, type):
            raise InvalidArgumentError(f"@tracked decorates a class, not {klass!r}")
        if not getattr(klass, "__dictoffset__", 0):
            raise InvalidArgumentError(
                f"@tracked needs instances with a __dict__; {klass.__qualname__} has "
                "__slots__ without '__dict__'")
        cls_name = f"{klass.__module__}.{klass.__qualname__}"
        short = klass.__qualname__
        orig_init: Callable[..., None] = klass.__init__  # type: ignore[misc]
        orig_set: Callable[[Any, str, Any], None] = klass.__setattr__  # type: ignore[assignment]
        orig_del: Callable[[Any, str], None] = klass.__delattr__  # type: ignore[assignment]

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_init(self, *args, **kwargs)
            if _BINDING not in vars(self):
                _bind(self, cls_name)

        def __setattr__(self: Any, name: str, value: Any) -> None:
            found = _live_binding(self) if _is_tracked(self, name) else None
            if found is None:
                orig_set(self, name, value)
                return
            b, st = found
            with st.lock:  # the map written is the object's, also with other writers
                new = _fields(self)
                new[name] = value
                blob = _encode(new, cls_name)
                old = vars(self).get(name, _MISSING)
                orig_set(self, name, value)
                try:
                    _store(st, b, blob, f"attr:{short}.{name}")
                except BaseException:
                    if old is _MISSING:
                        vars(self).pop(name, None)
                    else:
                        vars(self)[name] = old
                    raise

        def __delattr__(self: Any, name: str) -> None:
            found = _live_binding(self) if _is_tracked(self, name) else None
            if found is None:
                orig_del(self, name)
                return
            b, st = found
            with st.lock:
                new = _fields(self)
                new.pop(name, None)
                blob = _encode(new, cls_name)
                old = vars(self).get(name, _MISSING)
                orig_del(self, name)
                try:
                    _store(st, b, blob, f"delattr:{short}.{name}")
                except BaseException:
                    if old is not _MISSING:
                        vars(self)[name] = old
                    raise

        __init__.__wrapped__ = orig_init  # type: ignore[attr-defined]
        __init__.__qualname__ = f"{klass.__qualname__}.__init__"
        klass.__mmsb_tracked_fields__ = names  # type: ignore[attr-defined]
        entry = _TrackedClass(klass, {"__init__": __init__, "__setattr__": __setattr__,
                                      "__delattr__": __delattr__})
        with _classes_lock:
            _CLASSES.append(entry)
        if attributes_wanted():
            entry.install()
        return klass

    if cls is not None:
        return decorate(cls)
    return decorate


class _TrackedClass:
    """A @tracked class and its wrappers, which are on the class only while some
    state's instrumentation tracks attributes: otherwise the class is as it was
    written, and its instances cost nothing more."""

    __slots__ = ("klass", "wrappers", "saved", "installed")

    def __init__(self, klass: type, wrappers: dict[str, Any]) -> None:
        self.klass = klass
        self.wrappers = wrappers
        self.saved = {name: vars(klass).get(name, _MISSING) for name in wrappers}
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            for name, fn in self.wrappers.items():
                setattr(self.klass, name, fn)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            for name, value in self.saved.items():
                if value is _MISSING:
                    delattr(self.klass, name)
                else:
                    setattr(self.klass, name, value)
            self.installed = False


_CLASSES: list[_TrackedClass] = []
_classes_lock = threading.Lock()


def _sync_wrappers() -> None:
    want = attributes_wanted()
    with _classes_lock:
        for entry in _CLASSES:
            if want:
                entry.install()
            else:
                entry.uninstall()


LISTENERS.append(_sync_wrappers)


def wrappers_installed(cls: type) -> bool:
    """True while the tracking wrappers are on ``cls`` (a @tracked class)."""
    with _classes_lock:
        return any(e.klass is cls and e.installed for e in _CLASSES)


def page_of(obj: Any) -> int:
    """The page of a tracked object.

    Raises:
        InvalidArgumentError: the object has no page (not of a ``@tracked`` class, or
            made while no state with attribute tracking was active).
    """
    b = vars(obj).get(_BINDING) if hasattr(obj, "__dict__") else None
    if b is None:
        raise InvalidArgumentError(
            f"{type(obj).__qualname__} object has no page: decorate its class with "
            "@mmsb.tracked and create it while a state with instrumentation is active")
    page: int = b.page
    return page


@dataclass(frozen=True, slots=True)
class TrackedVersion:
    """A tracked object's attributes right after one logged write."""

    epoch: int
    lsn: int
    timestamp: int
    source: str
    """``init:Class``, ``attr:Class.name`` or ``delattr:Class.name``."""
    fields: dict[str, Any]


def tracked_history(state: MMSBState, obj_or_page: Any) -> list[TrackedVersion]:
    """Every retained version of a tracked object's attributes, oldest first (a replay
    of its page's deltas)."""
    pid = obj_or_page if isinstance(obj_or_page, int) else page_of(obj_or_page)
    return [TrackedVersion(s.epoch, s.lsn, s.timestamp, s.source, decode_tracked(s.data))
            for s in replay_page_history(state, pid)]


def field_blame(state: MMSBState, obj_or_page: Any) -> dict[str, TrackedVersion]:
    """For each current attribute, the version whose write gave it its current value."""
    versions = tracked_history(state, obj_or_page)
    out: dict[str, TrackedVersion] = {}
    prev: dict[str, Any] = {}
    for v in versions:
        for k, value in v.fields.items():
            if k not in prev or prev[k] != value or type(prev[k]) is not type(value):
                out[k] = v
        for k in list(out):
            if k not in v.fields:
                del out[k]
        prev = v.fields
    return out
