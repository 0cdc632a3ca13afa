"""Call trampolines: how the calls of one function are seen, at a cost to that
function's calls only, on interpreters without ``sys.monitoring``.

The function object stays what it is (every reference to it — module globals, class
dicts, ``staticmethod``/``classmethod`` wrappers, registries, closures, other modules'
imports — keeps working and is seen); only its ``__code__`` is swapped for a
*trampoline*: code with the same parameters (names, kinds, order), the same free
variables, name, qualified name, file and first line, whose one statement hands the
bound arguments on. A plain function's trampoline calls ``call(*args)``, a recording
callable that runs the original code (a private copy of the function, sharing its
globals and closure cells). A generator function's trampoline is a generator that
delegates (``yield from``) to ``segments(copy(*args))``, a coroutine function's is a
coroutine that awaits it, so ``inspect.isgeneratorfunction`` /
``iscoroutinefunction`` and ``inspect.signature`` answer as before (defaults and
annotations stay on the function object, which is unchanged).

The trampoline is compiled from generated text that holds only the parameter names
(identifiers read from the code object) and two placeholder string constants; the
constants are then replaced by the objects. Nothing is executed to build it.

:func:`real_code` maps a trampoline back to the code it stands for, so everything that
reads a function's code (IR capture, redefinition checks, provenance) sees the
function's own code while a trampoline is installed.
"""

from __future__ import annotations

import inspect
import threading
import types
import warnings
from typing import Any

__all__ = ["real_code", "function_of", "build", "installed", "register", "unregister",
           "kind_of", "PLAIN", "GENERATOR", "COROUTINE"]

PLAIN, GENERATOR, COROUTINE = "plain", "generator", "coroutine"

_CALL = "\x00mmsb:call"
_INNER = "\x00mmsb:inner"

_lock = threading.Lock()
_originals: dict[int, tuple[types.CodeType, types.CodeType]] = {}
"""id(trampoline) → (the trampoline, the code it stands for), while installed."""


def real_code(code: types.CodeType) -> types.CodeType:
    """The code a trampoline stands for; any other code as it is. O(1)."""
    found = _originals.get(id(code))
    return found[1] if found is not None and found[0] is code else code


def installed() -> int:
    """How many trampolines are installed (in any function) in this process."""
    return len(_originals)


def register(trampoline: types.CodeType, code: types.CodeType) -> None:
    with _lock:
        _originals[id(trampoline)] = (trampoline, code)


def unregister(trampoline: types.CodeType) -> None:
    with _lock:
        found = _originals.get(id(trampoline))
        if found is not None and found[0] is trampoline:
            del _originals[id(trampoline)]


def function_of(obj: Any) -> types.FunctionType | None:
    """The Python function behind a function, method, ``staticmethod``/``classmethod``,
    ``functools.partial``, ``__wrapped__`` chain or callable instance (None for
    builtins and code objects)."""
    for _ in range(16):
        if isinstance(obj, types.FunctionType):
            return obj
        if isinstance(obj, types.MethodType | staticmethod | classmethod):
            obj = obj.__func__
            continue
        func = getattr(obj, "func", None)
        if func is not None and callable(func) and type(obj).__name__ == "partial":
            obj = func
            continue
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            obj = wrapped
            continue
        call = next((vars(k)["__call__"] for k in type(obj).__mro__ if "__call__" in vars(k)),
                    None)
        return call if isinstance(call, types.FunctionType) else None
    return None


def kind_of(code: types.CodeType) -> str | None:
    """Which trampoline ``code`` gets: PLAIN, GENERATOR or COROUTINE; None for an async
    generator (an async generator cannot delegate ``asend``/``athrow`` to another)."""
    flags = code.co_flags
    if flags & inspect.CO_ASYNC_GENERATOR:
        return None
    if flags & inspect.CO_COROUTINE:
        return COROUTINE
    if flags & inspect.CO_GENERATOR:
        return GENERATOR
    return PLAIN


def _signature(code: types.CodeType) -> tuple[str, str]:
    """(the parameter list, the argument list that passes each parameter on)."""
    names = code.co_varnames
    npos, nposonly, nkw = code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount
    params: list[str] = []
    args: list[str] = []
    for i in range(npos):
        params.append(names[i])
        args.append(names[i])
        if nposonly and i == nposonly - 1:
            params.append("/")
    at = npos + nkw
    if code.co_flags & inspect.CO_VARARGS:
        params.append("*" + names[at])
        args.append("*" + names[at])
        at += 1
    elif nkw:
        params.append("*")
    for name in names[npos:npos + nkw]:
        params.append(name)
        args.append(f"{name}={name}")
    if code.co_flags & inspect.CO_VARKEYWORDS:
        params.append("**" + names[at])
        args.append("**" + names[at])
    return ", ".join(params), ", ".join(args)


def build(code: types.CodeType, call: Any, inner: Any = None) -> types.CodeType:
    """The trampoline of ``code`` (see the module's docstring): a plain one calls
    ``call(*args)``; a generator's or coroutine's delegates to ``call(inner(*args))``.

    Raises:
        ValueError: ``code`` is an async generator's.
    """
    kind = kind_of(code)
    if kind is None:
        raise ValueError(f"{code.co_qualname}: an async generator gets no trampoline")
    params, args = _signature(code)
    if kind == PLAIN:
        body = f"def f({params}): return {_CALL!r}({args})"
    elif kind == GENERATOR:
        body = f"def f({params}): return (yield from {_CALL!r}({_INNER!r}({args})))"
    else:
        body = f"async def f({params}): return await {_CALL!r}({_INNER!r}({args}))"
    free = code.co_freevars
    if free:
        # The same free variables (the function's closure cells are handed to whatever
        # code it runs): names of the enclosing function, used after the return.
        text = (f"def outer():\n    {' = '.join(free)} = None\n"
                f"    {body}; {', '.join(free)}\n")
    else:
        text = body + "\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # "str is not callable": replaced
        module = compile(text, code.co_filename, "exec", dont_inherit=True)
    found = _code_const(module, "outer") if free else module
    tramp = _code_const(found, "f") if found is not None else None
    if tramp is None or tramp.co_freevars != free:
        raise ValueError(f"{code.co_qualname}: no trampoline with its free variables {free}")
    objects = {_CALL: call, _INNER: inner}
    consts = tuple(objects.get(c, c) if isinstance(c, str) else c for c in tramp.co_consts)
    flags = tramp.co_flags | (code.co_flags & inspect.CO_ITERABLE_COROUTINE)
    return tramp.replace(co_consts=consts, co_name=code.co_name, co_qualname=code.co_qualname,
                         co_firstlineno=code.co_firstlineno, co_flags=flags)


def _code_const(code: types.CodeType, name: str) -> types.CodeType | None:
    return next((c for c in code.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == name), None)
