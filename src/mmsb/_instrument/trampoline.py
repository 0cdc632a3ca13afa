"""Call trampolines: how the calls of one function are seen, at a cost to that
function's calls only, on interpreters without ``sys.monitoring``.

The function object stays what it is (every reference to it — module globals, class
dicts, ``staticmethod``/``classmethod`` wrappers, registries, closures, other modules'
imports — keeps working and is seen); only its ``__code__`` is swapped for a
*trampoline*: code with the same parameters (names, kinds, order), the same free
variables, name, qualified name, file and first line (every instruction on that line),
which hands the bound arguments on to a private copy of the function (its original
code object, globals and closure cells) and does what the caller's template says
around that call (:mod:`.calls` records it). A generator function's trampoline is a
generator and a coroutine function's a coroutine, so ``inspect.isgeneratorfunction`` /
``iscoroutinefunction`` and ``inspect.signature`` answer as before (defaults and
annotations stay on the function object, which is unchanged).

The trampoline is compiled from generated text that holds only the parameter names
(identifiers read from the code object), names of its own locals, integers and
placeholder string constants; the constants are then replaced by the objects. Nothing is
executed to build it.

:func:`real_code` maps a trampoline back to the code it stands for, so everything that
reads a function's code (IR capture, redefinition checks, provenance) sees the
function's own code while a trampoline is installed.
"""

from __future__ import annotations

import inspect
import keyword
import threading
import types
import warnings
from typing import Any

__all__ = ["real_code", "function_of", "build", "installed", "register", "unregister",
           "kind_of", "PLAIN", "GENERATOR", "COROUTINE"]

PLAIN, GENERATOR, COROUTINE = "plain", "generator", "coroutine"

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
    """Note that ``trampoline`` stands for ``code`` (as it is put into a function)."""
    with _lock:
        _originals[id(trampoline)] = (trampoline, code)


def unregister(trampoline: types.CodeType) -> None:
    """Forget ``trampoline`` (as its function gets its own code back)."""
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


def build(code: types.CodeType, template: str, objects: dict[str, Any],
          temps: tuple[str, ...] = ()) -> types.CodeType:
    """The trampoline of ``code``, from ``template``: the text of a function ``f``
    (``def f({params}):`` or ``async def f({params}):`` and its body) in which
    ``{params}`` is the parameter list of ``code``, ``{args}`` the argument list passing
    every parameter on, each ``{name}`` of ``objects`` a constant that is that object,
    and each ``{name}`` of ``temps`` a local variable's name (chosen not to clash with a
    parameter or a free variable). Every instruction is placed on the first line of
    ``code`` (a traceback shows its ``def`` line); the flags say generator or
    coroutine as the template's text does, plus ``code``'s ``CO_ITERABLE_COROUTINE``.

    Raises:
        ValueError: ``code`` is an async generator's, or the template does not give a
            function with the free variables of ``code``.
    """
    if kind_of(code) is None:
        raise ValueError(f"{code.co_qualname}: an async generator gets no trampoline")
    odd = [n for n in code.co_varnames[:_nparams(code)] + code.co_freevars
           if not n.isidentifier() or keyword.iskeyword(n)]
    if odd:
        # Only plain identifiers ever reach the generated text (a code object built by
        # hand may name its variables anything).
        raise ValueError(f"{code.co_qualname}: names that are not identifiers {odd!r}")
    params, args = _signature(code)
    taken = set(code.co_varnames[:_nparams(code)]) | set(code.co_freevars)
    fields: dict[str, str] = {"params": params, "args": args}
    for name in temps:
        local = f"_mmsb_{name}"
        while local in taken:
            local += "_"
        taken.add(local)
        fields[name] = local
    marks = {f"\x00mmsb:{name}": obj for name, obj in objects.items()}
    fields.update({name: repr(f"\x00mmsb:{name}") for name in objects})
    body = template.format(**fields).rstrip("\n").split("\n")
    free = code.co_freevars
    if free:
        # The same free variables (the function's closure cells are handed to whatever
        # code it runs): names of an enclosing function, used after the body's return.
        lines = ["def outer():", f"    {' = '.join(free)} = None"]
        lines += ["    " + line for line in body]
        lines.append(f"        {', '.join(free)}")
    else:
        lines = body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # "str is not callable": replaced
        module = compile("\n".join(lines) + "\n", code.co_filename, "exec", dont_inherit=True)
    found = _code_const(module, "outer") if free else module
    tramp = _code_const(found, "f") if found is not None else None
    if tramp is None or tramp.co_freevars != free:
        raise ValueError(f"{code.co_qualname}: no trampoline with its free variables {free}")
    consts = tuple(marks.get(c, c) if isinstance(c, str) else c for c in tramp.co_consts)
    flags = tramp.co_flags | (code.co_flags & inspect.CO_ITERABLE_COROUTINE)
    return tramp.replace(co_consts=consts, co_name=code.co_name, co_qualname=code.co_qualname,
                         co_firstlineno=code.co_firstlineno, co_flags=flags,
                         co_linetable=_one_line(len(tramp.co_code) // 2))


def _nparams(code: types.CodeType) -> int:
    n = code.co_argcount + code.co_kwonlyargcount
    return n + bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)


def _one_line(units: int) -> bytes:
    """A 3.11 location table placing ``units`` code units on the first line: entries of
    kind 13 ("no column", a signed line delta of 0), eight code units at most each."""
    out = bytearray()
    while units > 0:
        n = min(units, 8)
        out += bytes((0x80 | (13 << 3) | (n - 1), 0))
        units -= n
    return bytes(out)


def _code_const(code: types.CodeType, name: str) -> types.CodeType | None:
    return next((c for c in code.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == name), None)
