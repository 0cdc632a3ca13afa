"""The instrumentation manager: code units on pages, the import hook, redefinition.

A *code unit* is one function (or method) or one module. Its artefacts — source text,
syntax tree, bytecode IR (:mod:`.ir`) — are pages linked source → ast → ir by
``COMPILER`` edges. A unit is captured when it is named in the config, when a module
matching the config's patterns is imported, and again when its code changes (a module
reload or re-import, ``__code__`` reassignment noticed by :func:`refresh_code`). A
change bumps the process-wide *world age*, rewrites the unit's pages as logged deltas,
and the ``COMPILER`` edges carry ``IR_INVALIDATED`` to what depends on the IR.

Nothing is installed while a state's instrumentation is disabled: no import hook, no
call hook (``sys.monitoring`` tool or trampoline), no recompute hook. The layer reads the engine through its public methods and
changes pages through the function API handed in by ``_api`` (:class:`PageOps`).
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.abc
import inspect
import linecache
import logging
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .._core.propagation import Passthrough
from ..errors import InvalidArgumentError, MMSBError
from ..types import EdgeType, EventType
from .config import ARTEFACT_KINDS, InstrumentationConfig
from .ir import code_of, extract_code_ir, ir_code_hash, serialize_ast, serialize_code_ir

if TYPE_CHECKING:
    from .._core.engine import MMSBState
    from .calls import CallRecorder

__all__ = [
    "PageOps", "CodeUnit", "Instrumentation", "manager_of", "enable", "disable",
    "world_age", "ARTEFACT_META", "PRODUCED_BY", "INSTRUMENT_SOURCE", "PROVENANCE_SOURCE",
]

log = logging.getLogger("mmsb.instrument")

ARTEFACT_META = "code_artefact"
"""Metadata key of a code page: kind, unit name, unit type, module, hash, world age."""
PRODUCED_BY = "produced_by"
"""Metadata key of a recomputed page: the code behind its propagated deltas."""
INSTRUMENT_SOURCE = "instrument"
"""Delta and metadata source of code-page writes."""
PROVENANCE_SOURCE = "provenance"
"""Metadata source of provenance records."""


class PageOps(NamedTuple):
    """The function API calls the layer changes pages with (handed in by ``_api``, so
    every change is checked and logged the one way)."""

    create_page: Callable[..., Any]
    update_page: Callable[..., Any]
    resize_page: Callable[..., Any]
    add_dependency: Callable[..., Any]
    update_metadata: Callable[..., Any]
    apply_batch: Callable[..., Any]
    query_page: Callable[..., bytes]


# -- world age -------------------------------------------------------------------------

_age_lock = threading.Lock()
_world_age = 0


def world_age() -> int:
    """The process-wide code generation: 0 at start, +1 each time instrumented code
    changes (a reload, a re-import with edited source, a ``__code__`` reassignment)."""
    return _world_age


def _bump_world_age() -> int:
    global _world_age
    with _age_lock:
        _world_age += 1
        return _world_age


# -- code units --------------------------------------------------------------------------

@dataclass(slots=True)
class CodeUnit:
    """One function or module whose artefacts are on pages."""

    name: str
    """``module:qualname`` for a function, the module name for a module."""
    unit: str
    """``"function"`` or ``"module"``."""
    module: str
    pages: dict[str, int] = field(default_factory=dict)
    """Artefact kind → page id."""
    code: types.CodeType | None = None
    """The code object the IR page holds (a module's: compiled from its source)."""
    code_hash: str = ""
    world_age: int = 0
    """The world age when the code last changed."""
    obj: Any = None
    """A weak reference to the function or module (None when it cannot be had)."""
    epochs: dict[str, int] = field(default_factory=dict)
    """Code hash → the IR page's epoch that holds it (every version seen)."""

    @property
    def code_page(self) -> int:
        """The page a call or a provenance record names: the IR page, else the last
        artefact page."""
        if "ir" in self.pages:
            return self.pages["ir"]
        return self.pages[max(self.pages, key=ARTEFACT_KINDS.index)] if self.pages else 0


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


# -- the per-state manager ---------------------------------------------------------------

_LOCK_WAIT_S = 2.0
_MANAGERS: weakref.WeakKeyDictionary[Any, Instrumentation] = weakref.WeakKeyDictionary()
_registry_lock = threading.RLock()


LISTENERS: list[Callable[[], None]] = []
"""Called after any state's instrumentation is enabled, reconfigured or disabled."""


def attributes_wanted() -> bool:
    """True while some live state's instrumentation tracks attributes."""
    with _registry_lock:
        return any(m.config.attributes and m.state() is not None for m in _MANAGERS.values())


def _changed() -> None:
    for listener in LISTENERS:
        listener()


def manager_of(state: MMSBState) -> Instrumentation | None:
    """The state's instrumentation manager, None when disabled."""
    return _MANAGERS.get(state)


class Instrumentation:
    """One state's instrumentation: its config, code units, hooks and notes."""

    def __init__(self, state: MMSBState, config: InstrumentationConfig, ops: PageOps) -> None:
        self.state_ref = weakref.ref(state)
        self.config = config
        self.ops = ops
        self.units: dict[str, CodeUnit] = {}
        self.by_code: dict[int, tuple[CodeUnit, types.CodeType]] = {}
        """id(code object) → (unit, that code object, kept alive so the id stays its)."""
        self.notes: list[str] = []
        """What was left out and why (no source, too large, capture deferred …)."""
        self.deferred: list[tuple[str, Any]] = []
        self.bound: dict[int, tuple[Any, Any, Any]] = {}
        """page id → (recompute fn, its code, the metadata dict checked last)."""
        self.calls: CallRecorder | None = None
        self.lock = threading.RLock()

    # -- lifecycle -----------------------------------------------------------------------
    def state(self) -> MMSBState | None:
        st = self.state_ref()
        if st is None or st.closed:
            return None
        return st

    def install(self) -> None:
        st = self.state_ref()
        assert st is not None
        if self.config.provenance:
            st.recompute_hook = self.on_recompute
        elif st.recompute_hook == self.on_recompute:
            st.recompute_hook = None
        _sync_finder()
        for fn in self.config.functions:
            self.capture_function(fn)
        for name, module in list(sys.modules.items()):
            if module is not None and self.wants_module(name):
                self.capture_module(module)
        self.link_recompute_fns()
        cfg = self.config
        if self.calls is not None and (not cfg.calls or self.calls.settings != (
                cfg.call_sample_every, cfg.flush_every, cfg.ring_capacity)):
            self.calls.uninstall(flush=True)  # new settings: a new recorder takes over
            self.calls = None
        if self.config.calls and self.calls is None:
            from .calls import CallRecorder

            self.calls = CallRecorder(self)
            self.calls.install()
        elif not self.config.calls and self.calls is not None:
            self.calls.uninstall(flush=True)
            self.calls = None

    def uninstall(self) -> None:
        if self.calls is not None:
            self.calls.uninstall(flush=True)
            self.calls = None
        st = self.state_ref()
        if st is not None and st.recompute_hook == self.on_recompute:
            st.recompute_hook = None

    # -- what to capture -----------------------------------------------------------------
    def wants_module(self, name: str) -> bool:
        if name == "mmsb" or name.startswith("mmsb.") or name == "__main__":
            return False
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.config.modules)

    def unit_for(self, obj: Any) -> CodeUnit | None:
        """The unit of a function, method, code object, module, or unit name."""
        if isinstance(obj, str):
            return self.units.get(obj)
        if isinstance(obj, types.ModuleType):
            return self.units.get(obj.__name__)
        code = code_of(obj)
        if code is None:
            return None
        found = self.by_code.get(id(code))
        if found is not None and found[1] is code:
            return found[0]
        name = _function_name(obj, code)
        unit = self.units.get(name)
        return unit if unit is not None and _same_object(unit, obj) else None

    # -- capture -------------------------------------------------------------------------
    def capture_function(self, fn: Any) -> CodeUnit | None:
        """Capture (or recapture) one function. None when it has no Python code or the
        state cannot take the change now (then it is deferred)."""
        code = code_of(fn)
        if code is None:
            self._note(f"{fn!r} has no Python code; nothing captured")
            return None
        name = _function_name(fn, code)
        module = getattr(fn, "__module__", None) or code.co_filename
        unit = self._capture([(name, "function", module, fn, code, None)])[0]
        if unit is not None and unit.code is code and self.calls is not None:
            # Another function object running the same code (closures made by one
            # factory) is the same unit; its calls are recorded too.
            self.calls.add(code, unit.code_page, fn)
        return unit

    def capture_module(self, module: types.ModuleType, source: str | None = None) -> None:
        """Capture a module and the functions and methods it defines."""
        mname = module.__name__
        if source is None:
            source = _module_source(module)
        items: list[tuple[str, str, str, Any, types.CodeType | None, str | None]] = []
        mcode: types.CodeType | None = None
        if source is not None:
            try:
                mcode = compile(source, getattr(module, "__file__", None) or f"<{mname}>",
                                "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as exc:
                self._note(f"module {mname}: its source does not compile ({exc})")
        else:
            self._note(f"module {mname}: no source available; only its functions' IR captured")
        items.append((mname, "module", mname, module, mcode, source))
        for fn in _functions_of(module):
            code = code_of(fn)
            if code is not None:
                items.append((_function_name(fn, code), "function", mname, fn, code, None))
        self._capture(items)

    def _capture(self, items: list[tuple[str, str, str, Any, types.CodeType | None, str | None]]
                 ) -> list[CodeUnit | None]:
        st = self.state()
        if st is None:
            return [None] * len(items)
        if st.batch_frame is not None or st.recomputing is not None or st.propagating:
            # Structural changes wait until the batch or propagation pass is over.
            self.deferred.extend((it[0], it[3]) for it in items)
            self._note(f"capture of {len(items)} unit(s) deferred (the state was inside a "
                       "batch or a propagation pass); refresh_code() takes them up")
            return [None] * len(items)
        # The state's lock is taken for the whole capture, so it is atomic for other
        # writers; with a timeout, because the caller may hold an import lock that a
        # thread holding the state's lock is waiting for (a lazy import).
        if not st.lock.acquire(timeout=_LOCK_WAIT_S):
            self.deferred.extend((it[0], it[3]) for it in items)
            self._note(f"capture of {len(items)} unit(s) deferred (the state was busy); "
                       "refresh_code() takes them up")
            return [None] * len(items)
        try:
            return self._capture_locked(st, items)
        finally:
            st.lock.release()

    def _capture_locked(self, st: MMSBState,
                        items: list[tuple[str, str, str, Any, types.CodeType | None, str | None]]
                        ) -> list[CodeUnit | None]:
        with self.lock:
            prepared: list[tuple[CodeUnit | None, Any, dict[str, bytes] | None, str]] = []
            for name, kind, module, obj, code, source in items:
                unit = self.units.get(name)
                if unit is not None and code is not None and unit.code is code and (
                        kind == "function" or source is None):
                    prepared.append((unit, None, None, ""))
                    continue
                blobs, new_hash = self._artefacts(name, kind, obj, code, source)
                prepared.append((unit, (name, kind, module, obj, code), blobs, new_hash))
            changed_any = any(
                p[0] is not None and p[1] is not None and p[3] and p[3] != p[0].code_hash
                for p in prepared)
            age = _bump_world_age() if changed_any else world_age()
            out: list[CodeUnit | None] = []
            for unit, info, found, new_hash in prepared:
                if info is None or found is None:
                    out.append(unit)
                    continue
                out.append(self._store(st, unit, info, found, new_hash or "", age))
            self.link_recompute_fns()
            return out

    def _artefacts(self, name: str, kind: str, obj: Any, code: types.CodeType | None,
                   source: str | None) -> tuple[dict[str, bytes], str]:
        cap = self.config.capture
        blobs: dict[str, bytes] = {}
        if kind == "function" and ("source" in cap or "ast" in cap):
            source = _function_source(obj, code)
        if source is not None and "source" in cap:
            blobs["source"] = source.encode("utf-8", "surrogateescape")
        if source is not None and "ast" in cap:
            try:
                blobs["ast"] = serialize_ast(ast.parse(source))
            except (SyntaxError, ValueError, RecursionError, InvalidArgumentError) as exc:
                self._note(f"{name}: no syntax tree ({exc})")
        new_hash = ""
        if code is not None:
            try:
                ir = extract_code_ir(code)
                new_hash = ir_code_hash(ir)
                if "ir" in cap:
                    blobs["ir"] = serialize_code_ir(ir)
            except (RecursionError, InvalidArgumentError) as exc:
                self._note(f"{name}: no IR ({exc})")
        for k in [k for k, b in blobs.items() if not b]:
            del blobs[k]  # an empty source: no page can hold zero bytes
        cap_bytes = self.config.max_artefact_bytes
        for k in [k for k, b in blobs.items() if len(b) > cap_bytes]:
            self._note(f"{name}: {k} is {len(blobs[k])} bytes, over max_artefact_bytes "
                       f"({cap_bytes}); left out")
            del blobs[k]
        if not blobs and code is None:
            self._note(f"{name}: nothing to capture")
        return blobs, new_hash

    def _store(self, st: MMSBState, unit: CodeUnit | None,
               info: tuple[str, str, str, Any, types.CodeType | None], blobs: dict[str, bytes],
               new_hash: str, age: int) -> CodeUnit:
        name, kind, module, obj, code = info
        ops = self.ops
        first = unit is None
        start_page = 0 if unit is None else unit.code_page
        _emit(st, EventType.COMPILE_START, start_page, name)
        if unit is None:
            unit = CodeUnit(name, kind, module, world_age=age)
            self.units[name] = unit
        changed = not first and bool(new_hash) and new_hash != unit.code_hash
        if changed or first:
            unit.world_age = age if changed else unit.world_age
        # A bound method is made anew at each attribute access: its function is kept.
        unit.obj = _weak(obj.__func__ if isinstance(obj, types.MethodType) else obj)
        previous = unit.pages.get("ir")
        for k in ARTEFACT_KINDS:
            blob = blobs.get(k)
            if blob is None:
                continue
            meta = {ARTEFACT_META: {"kind": k, "name": name, "unit": kind, "module": module,
                                    "hash": new_hash, "world_age": unit.world_age}}
            pid = unit.pages.get(k)
            if pid is None or pid not in st.pages:
                pid = ops.create_page(st, len(blob), metadata=meta).id
                ops.update_page(st, pid, blob, source=INSTRUMENT_SOURCE)
                unit.pages[k] = pid
                self._link_chain(st, unit, k)
                continue
            if k == "ir" and not changed and not first and new_hash == unit.code_hash:
                continue  # same behaviour: positions alone do not invalidate dependants
            if ops.query_page(st, pid) != blob:
                if int(st.table.size[pid]) != len(blob):
                    ops.resize_page(st, pid, len(blob))
                ops.update_page(st, pid, blob, source=INSTRUMENT_SOURCE)
            self._set_meta(st, pid, meta, revalidate=k != "source")
        if code is not None:
            unit.code = code
            unit.code_hash = new_hash
            self.by_code[id(code)] = (unit, code)
            if self.calls is not None:
                self.calls.add(code, unit.code_page, obj)
            if "ir" in unit.pages:
                unit.epochs.setdefault(new_hash, int(st.table.epoch[unit.pages["ir"]]))
        if changed and previous is not None:
            self._invalidate_beyond(st, previous)
        _emit(st, EventType.COMPILE_COMPLETE, unit.code_page, name, unit.world_age, changed)
        return unit

    def _link_chain(self, st: MMSBState, unit: CodeUnit, kind: str) -> None:
        """COMPILER edges between consecutive captured artefacts: source → ast → ir."""
        order = [k for k in ARTEFACT_KINDS if k in unit.pages]
        i = order.index(kind)
        if i > 0:
            self.ops.add_dependency(st, unit.pages[order[i - 1]], unit.pages[kind],
                                    EdgeType.COMPILER)
        if i + 1 < len(order):
            self.ops.add_dependency(st, unit.pages[kind], unit.pages[order[i + 1]],
                                    EdgeType.COMPILER)

    def _set_meta(self, st: MMSBState, pid: int, meta: dict[str, Any], revalidate: bool) -> None:
        current = dict(st.table.meta.get(pid, {}))
        new = dict(current)
        new.update(meta)
        if revalidate and new.get("ir_valid") is False:
            new["ir_valid"] = True  # recaptured just now: valid again
        if new != current:
            self.ops.update_metadata(st, pid, new, replace=True)

    def _invalidate_beyond(self, st: MMSBState, ir_page: int) -> None:
        """Propagation marks the IR page's direct COMPILER children; the flag then
        follows COMPILER edges further down (a page compiled from an invalid one is
        invalid too)."""
        children = st.graph.children
        first = [c for c, et in children.get(ir_page, {}).items() if et is EdgeType.COMPILER]
        seen = set(first) | {ir_page}
        queue = [(c, p) for p in first for c, et in children.get(p, {}).items()
                 if et is EdgeType.COMPILER]
        own = {p for u in self.units.values() for p in u.pages.values()}
        while queue:
            node, parent = queue.pop(0)
            if node in seen or node in own or node not in st.pages:
                continue
            seen.add(node)
            meta = dict(st.table.meta.get(node, {}))
            if meta.get("ir_valid") is not False:
                meta["ir_valid"] = False
                self.ops.update_metadata(st, node, meta, replace=True)
            _emit(st, EventType.IR_INVALIDATED, node, parent)
            queue.extend((c, node) for c, et in children.get(node, {}).items()
                         if et is EdgeType.COMPILER)

    def _note(self, text: str) -> None:
        log.info("%s", text)
        if len(self.notes) < 1000:
            self.notes.append(text)

    # -- redefinition --------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Recapture every unit whose function's ``__code__`` changed, and what was
        deferred; returns the names of the units whose code changed."""
        before = {n: u.code_hash for n, u in self.units.items()}
        deferred, self.deferred = self.deferred, []
        for name, obj in deferred:
            if isinstance(obj, types.ModuleType):
                self.capture_module(obj)
            elif name not in self.units or self.units[name].code is not code_of(obj):
                self.capture_function(obj)
        for unit in list(self.units.values()):
            ref = unit.obj() if unit.obj is not None else None
            if ref is None or unit.unit != "function":
                continue
            code = code_of(ref)
            if code is not None and code is not unit.code:
                self.capture_function(ref)
        if self.calls is not None:
            self.calls.resync()
        return sorted(n for n, u in self.units.items() if n in before and before[n] != u.code_hash)

    # -- recompute functions -------------------------------------------------------------
    def link_recompute_fns(self) -> None:
        """COMPILER edges from each instrumented recompute function's IR page to the
        page it computes, so a change of that code invalidates the page."""
        st = self.state()
        if st is None:
            return
        for pid, fn in list(st.recompute_fns.items()):
            self.link_recompute(st, pid, fn)

    def link_recompute(self, st: MMSBState, pid: int, fn: Any) -> None:
        target = fn.transform if isinstance(fn, Passthrough) else fn
        if target is None:
            return
        unit = self.unit_for(target)
        if unit is None or "ir" not in unit.pages:
            return
        ir = unit.pages["ir"]
        if ir == pid or st.graph.children.get(ir, {}).get(pid) is EdgeType.COMPILER:
            return
        try:
            self.ops.add_dependency(st, ir, pid, EdgeType.COMPILER)
        except MMSBError as exc:
            self._note(f"no COMPILER edge {ir} → {pid}: {exc}")

    # -- provenance ----------------------------------------------------------------------
    def describe(self, fn: Any) -> dict[str, Any]:
        """The provenance record of a recompute function: its name, the hash of its
        code, and (instrumented code) its IR page and the epoch that holds it."""
        if isinstance(fn, Passthrough):
            if fn.transform is None:
                return {"name": "passthrough", "hash": "", "source_page": fn.source}
            desc = self.describe(fn.transform)
            desc["source_page"] = fn.source
            return desc
        code = code_of(fn)
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        module = getattr(fn, "__module__", None) or ""
        if code is None:
            return {"name": f"{module}:{name}" if module else name, "hash": ""}
        digest = _hash_of(code)
        out: dict[str, Any] = {"name": _function_name(fn, code), "hash": digest}
        found = self.by_code.get(id(code))
        unit = found[0] if found is not None and found[1] is code else None
        if unit is None:
            unit = next((u for u in self.units.values() if digest in u.epochs), None)
        if unit is not None and "ir" in unit.pages and digest in unit.epochs:
            out["ir_page"] = unit.pages["ir"]
            out["ir_epoch"] = unit.epochs[digest]
        return out

    def on_recompute(self, st: MMSBState, pid: int, fn: Any) -> None:
        """The engine's recompute hook: before ``fn`` recomputes page ``pid``, make sure
        the page's ``produced_by`` metadata names ``fn``'s code (a logged metadata
        change when it did not). O(1) when nothing changed."""
        meta = st.table.meta.get(pid)
        code = fn if isinstance(fn, Passthrough) else code_of(fn)
        if isinstance(fn, Passthrough) and fn.transform is not None:
            code = code_of(fn.transform)
        seen = self.bound.get(pid)
        if seen is not None and seen[0] is fn and seen[1] is code and seen[2] is meta:
            return
        desc = self.describe(fn)
        current = None if meta is None else meta.get(PRODUCED_BY)
        if current != desc:
            new = dict(meta or {})
            if (new.get("ir_valid") is False and isinstance(current, dict)
                    and current.get("hash") != desc.get("hash")):
                new["ir_valid"] = True  # recomputed by the new code: valid again
            new[PRODUCED_BY] = desc
            st.commit_metadata(pid, new, PROVENANCE_SOURCE)
        self.bound[pid] = (fn, code, st.table.meta.get(pid))


_hashes: weakref.WeakKeyDictionary[types.CodeType, str] = weakref.WeakKeyDictionary()


def _hash_of(code: types.CodeType) -> str:
    try:
        return _hashes[code]
    except KeyError:
        digest = ir_code_hash(extract_code_ir(code))
        _hashes[code] = digest
        return digest


def _function_name(fn: Any, code: types.CodeType) -> str:
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str) or not module:
        module = code.co_filename
    qual = getattr(fn, "__qualname__", None)
    if not isinstance(qual, str):
        qual = code.co_qualname
    return f"{module}:{qual}"


def _same_object(unit: CodeUnit, obj: Any) -> bool:
    ref = unit.obj() if unit.obj is not None else None
    return ref is obj


def _emit(st: MMSBState, event: EventType, *data: Any) -> None:
    st.enter()
    try:
        st.emit(event, *data)
    finally:
        st.leave()


def _function_source(fn: Any, code: types.CodeType | None) -> str | None:
    target = fn
    if code is not None and not isinstance(fn, types.FunctionType | types.MethodType):
        target = code
    try:
        filename = inspect.getsourcefile(target)
        if filename:
            linecache.checkcache(filename)
        return textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError):
        return None


def _module_source(module: types.ModuleType) -> str | None:
    loader = getattr(module, "__loader__", None)
    get = getattr(loader, "get_source", None)
    if get is not None:
        try:
            text = get(module.__name__)
        except (ImportError, OSError, SyntaxError, UnicodeDecodeError):
            text = None
        if isinstance(text, str):
            return text
    try:
        filename = inspect.getsourcefile(module)
        if filename:
            linecache.checkcache(filename)
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _functions_of(module: types.ModuleType) -> Iterator[Any]:
    """Functions and methods the module defines (classes one level deep), once each."""
    name = module.__name__
    seen: set[int] = set()
    for obj in list(vars(module).values()):
        if isinstance(obj, types.FunctionType) and obj.__module__ == name:
            if id(obj) not in seen:
                seen.add(id(obj))
                yield obj
        elif isinstance(obj, type) and obj.__module__ == name:
            for member in list(vars(obj).values()):
                fn = member
                if isinstance(member, staticmethod | classmethod):
                    fn = member.__func__
                elif isinstance(member, property):
                    fn = member.fget
                if isinstance(fn, types.FunctionType) and fn.__module__ == name \
                        and id(fn) not in seen:
                    seen.add(id(fn))
                    yield fn


# -- the import hook -----------------------------------------------------------------------

class _CapturingLoader:
    """Wraps a module's loader: runs it, then captures the module for every state whose
    patterns match. Everything else is the wrapped loader's."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        source = None
        get = getattr(self._loader, "get_source", None)
        if get is not None:
            try:
                text = get(module.__name__)
            except (ImportError, OSError, SyntaxError, UnicodeDecodeError):
                text = None
            source = text if isinstance(text, str) else None
        for mgr in _managers_for(module.__name__):
            try:
                mgr.capture_module(module, source)
            except Exception as exc:  # instrumentation never breaks the program's import
                log.warning("capture of module %s failed: %r", module.__name__, exc)
                mgr._note(f"capture of module {module.__name__} failed: {exc!r}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _CodeFinder(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` while any state captures modules by pattern: finds the spec
    the other finders give and wraps its loader."""

    _busy = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if getattr(self._busy, "on", False) or not _managers_for(fullname):
            return None
        self._busy.on = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        if not isinstance(spec.loader, _CapturingLoader):
            spec.loader = _CapturingLoader(spec.loader, fullname)  # type: ignore[assignment]
        return spec


_FINDER = _CodeFinder()


def _managers_for(name: str) -> list[Instrumentation]:
    with _registry_lock:
        managers = list(_MANAGERS.values())
    return [m for m in managers if m.config.modules and m.wants_module(name)
            and m.state() is not None]


def _sync_finder() -> None:
    """The finder is on sys.meta_path exactly while some state captures modules."""
    with _registry_lock:
        needed = any(m.config.modules and m.state() is not None for m in _MANAGERS.values())
        present = _FINDER in sys.meta_path
        if needed and not present:
            sys.meta_path.insert(0, _FINDER)
        elif not needed and present:
            sys.meta_path.remove(_FINDER)


def finder_installed() -> bool:
    """True while the import hook is on ``sys.meta_path``."""
    return _FINDER in sys.meta_path


# -- enabling --------------------------------------------------------------------------------

def enable(state: MMSBState, config: InstrumentationConfig, ops: PageOps) -> Instrumentation:
    """Enable (or re-enable with a new config) instrumentation on ``state``."""
    if not isinstance(config, InstrumentationConfig):
        raise InvalidArgumentError(
            f"config must be an InstrumentationConfig, not {type(config).__name__}")
    if config.calls:
        from .calls import check_can_record

        existing = _MANAGERS.get(state)
        check_can_record(existing.calls if existing is not None else None)
    with _registry_lock:
        mgr = _MANAGERS.get(state)
        if mgr is None:
            mgr = Instrumentation(state, config, ops)
            _MANAGERS[state] = mgr
            if disable not in state.close_hooks:
                state.close_hooks = (*state.close_hooks, disable)
        else:
            mgr.config = config
    try:
        mgr.install()
    finally:
        _changed()
    return mgr


def disable(state: MMSBState) -> bool:
    """Remove every hook the state's instrumentation installed; False if it had none."""
    with _registry_lock:
        mgr = _MANAGERS.pop(state, None)
    if disable in state.close_hooks:
        state.close_hooks = tuple(h for h in state.close_hooks if h is not disable)
    if mgr is None:
        return False
    mgr.uninstall()
    _sync_finder()
    _changed()
    return True


def content_hash(data: bytes) -> str:
    """SHA-256 (hex) of bytes."""
    return hashlib.sha256(data).hexdigest()
