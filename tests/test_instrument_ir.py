"""Code IR and syntax trees as data: a faithful, deterministic round trip of every field
on varied functions; damaged or crafted bytes refused with SerializationError; nothing
decoded is ever a code object."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dis
import functools
import inspect
import struct
import sys
import textwrap
import types
from typing import Any

import crc32c
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmsb
from mmsb._instrument.ir import (
    AST_MAGIC,
    IR_MAGIC,
    CodeIR,
    code_of,
    extract_code_ir,
    ir_code_hash,
)

# -- twenty-odd varied functions ----------------------------------------------------------


def plain(a, b):
    return a + b


def defaults_kwonly_posonly(a, b=2, /, c=3, *args, d, e=5, **kwargs):
    return a, b, c, args, d, e, kwargs


def make_closure(n):
    def add(x):
        return x + n
    return add


CLOSURE = make_closure(7)


def make_counter():
    count = 0

    def bump():
        nonlocal count
        count += 1
        return count
    return bump


COUNTER = make_counter()


def generator(n):
    for i in range(n):
        yield i * i
    return "done"


def delegating(n):
    yield from generator(n)


async def coroutine(x):
    await asyncio.sleep(0)
    return x * 2


async def async_generator(n):
    for i in range(n):
        yield i
        await asyncio.sleep(0)


def comprehensions(xs):
    a = [x for x in xs if x % 2]
    b = {x: x * x for x in xs}
    c = {x % 3 for x in xs}
    d = sum(x for x in xs)
    return a, b, c, d


def constants():
    return (1 << 80, -(1 << 70), 3.5, -0.0, 2 + 3j, b"\x00\xff", "text", None, True, ...,
            (1, (2, "x")), 10 in {1, 2, 10})


def exceptions(x):
    try:
        return 1 / x
    except ZeroDivisionError as exc:
        raise ValueError("zero") from exc
    finally:
        pass


def exception_groups():
    seen = []
    try:
        raise ExceptionGroup("g", [ValueError(1), TypeError(2)])
    except* ValueError:
        seen.append("v")
    except* TypeError:
        seen.append("t")
    return seen


def with_statements(path):
    with contextlib.suppress(OSError), open(path) as f:
        return f.read()


def pattern_matching(value):
    match value:
        case {"kind": "point", "x": x, "y": y}:
            return (x, y)
        case [first, *rest]:
            return first, rest
        case int() | float() as n if n > 0:
            return n
        case _:
            return None


def fstrings_and_walrus(items):
    if (n := len(items)) > 2:
        return f"{n!r:>5} items, first {items[0]}"
    return f"{n}"


def uses_globals():
    global GLOBAL_COUNTER
    GLOBAL_COUNTER = GLOBAL_COUNTER + 1
    return GLOBAL_COUNTER


GLOBAL_COUNTER = 0


def recursive(n):
    """Factorial, with a docstring constant."""
    return 1 if n <= 1 else n * recursive(n - 1)


def lambdas():
    key = lambda pair: (pair[1], pair[0])  # noqa: E731
    return sorted([(1, 2), (0, 3)], key=key)


def starred(*args, **kwargs):
    first, *middle, last = args
    return [*middle, *kwargs], {**kwargs, "n": len(middle)}


def decorator(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        return fn(*a, **k)
    return wrapper


@decorator
def decorated(x):
    return -x


class Shapes:
    scale = 2

    def method(self, x):
        return x * self.scale

    @classmethod
    def cls_method(cls, x):
        return cls.scale + x

    @staticmethod
    def static(x, y):
        return x - y

    @property
    def prop(self):
        return self.scale

    def __call__(self, v):
        return [i * self.scale for i in v]


def nested_class_factory():
    class Inner:
        def hello(self):
            return super().__repr__()
    return Inner


SAMPLES: list[Any] = [
    plain, defaults_kwonly_posonly, CLOSURE, COUNTER, make_closure, generator, delegating,
    coroutine, async_generator, comprehensions, constants, exceptions, exception_groups,
    with_statements, pattern_matching, fstrings_and_walrus, uses_globals, recursive, lambdas,
    starred, decorated, decorator, Shapes.method, Shapes.cls_method, Shapes.static,
    Shapes.prop.fget, Shapes(), nested_class_factory, functools.partial(plain, 1),
    Shapes().method,
]


def _ids(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def test_there_are_at_least_twenty_samples() -> None:
    assert len(SAMPLES) >= 20
    assert len({id(code_of(f)) for f in SAMPLES}) >= 20


@pytest.mark.parametrize("fn", SAMPLES, ids=_ids)
def test_round_trip_keeps_every_field(fn: Any) -> None:
    code = code_of(fn)
    assert isinstance(code, types.CodeType)
    blob = mmsb.serialize_code_ir(fn)
    assert blob[:8] == IR_MAGIC
    ir = mmsb.deserialize_code_ir(blob)
    assert ir == extract_code_ir(fn)
    assert mmsb.serialize_code_ir(ir) == blob  # bytes → data → the same bytes
    assert mmsb.serialize_code_ir(fn) == blob  # deterministic
    # Every field of the code object, as the interpreter has it.
    assert (ir.name, ir.qualname, ir.filename, ir.firstlineno) == (
        code.co_name, code.co_qualname, code.co_filename, code.co_firstlineno)
    assert (ir.argcount, ir.posonlyargcount, ir.kwonlyargcount, ir.nlocals, ir.stacksize,
            ir.flags) == (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                          code.co_nlocals, code.co_stacksize, code.co_flags)
    assert ir.varnames == code.co_varnames and ir.names == code.co_names
    assert ir.freevars == code.co_freevars and ir.cellvars == code.co_cellvars
    assert ir.code == code.co_code and ir.linetable == code.co_linetable
    assert ir.exceptiontable == code.co_exceptiontable
    expected = list(dis.get_instructions(code))
    assert [(i.offset, i.opcode, i.opname, i.arg, tuple(i.positions), i.is_jump_target)
            for i in expected] == [(i.offset, i.opcode, i.opname, i.arg, i.positions,
                                    i.is_jump_target) for i in ir.instructions]
    # Constants, nested code included, compare as data.
    assert len(ir.consts) == len(code.co_consts)
    for got, want in zip(ir.consts, code.co_consts, strict=True):
        _same_const(got, want)


def _same_const(got: Any, want: Any) -> None:
    if isinstance(want, types.CodeType):
        assert isinstance(got, CodeIR)
        assert got == extract_code_ir(want)
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same_const(g, w)
    else:
        assert type(got) is type(want) and got == want or (got != got and want != want)


def test_flags_are_named() -> None:
    assert "GENERATOR" in mmsb.deserialize_code_ir(mmsb.serialize_code_ir(generator)).flag_names
    assert "COROUTINE" in mmsb.deserialize_code_ir(mmsb.serialize_code_ir(coroutine)).flag_names
    flags = mmsb.deserialize_code_ir(mmsb.serialize_code_ir(CLOSURE)).flag_names
    assert "NESTED" in flags


def test_nested_code_is_data_never_a_code_object() -> None:
    ir = mmsb.deserialize_code_ir(mmsb.serialize_code_ir(comprehensions))
    nested = ir.walk()
    # The function and its comprehensions (3.12 inlines list, set and dict ones).
    assert len(nested) >= (2 if sys.version_info >= (3, 12) else 5)
    seen: list[Any] = []

    def visit(v: Any) -> None:
        seen.append(v)
        if isinstance(v, CodeIR):
            for c in v.consts:
                visit(c)
        elif isinstance(v, tuple | frozenset):
            for c in v:
                visit(c)

    visit(ir)
    assert not any(isinstance(v, types.CodeType | types.FunctionType) for v in seen)


def test_big_ints_sets_and_specials_survive() -> None:
    ir = mmsb.deserialize_code_ir(mmsb.serialize_code_ir(constants))
    flat = [c for c in ir.consts if isinstance(c, tuple)]
    assert any(1 << 80 in t for t in flat) or 1 << 80 in ir.consts
    fs = [c for c in extract_code_ir(constants).consts if isinstance(c, frozenset)]
    assert all(isinstance(c, frozenset) for c in fs)


def test_recompiled_source_gives_identical_bytes() -> None:
    src = "def f(x):\n    return [lambda: i for i in range(x)]\n"
    a = compile(src, "<m>", "exec", dont_inherit=True)
    b = compile(src, "<m>", "exec", dont_inherit=True)
    assert a is not b
    assert mmsb.serialize_code_ir(a) == mmsb.serialize_code_ir(b)  # no addresses inside


def test_hash_follows_behaviour_not_position() -> None:
    one = compile("def f(x):\n    return x + 1\n", "<a>", "exec", dont_inherit=True)
    moved = compile("\n\n\ndef f(x):\n    return x + 1\n", "<b>", "exec", dont_inherit=True)
    other = compile("def f(x):\n    return x + 2\n", "<a>", "exec", dont_inherit=True)
    h = [ir_code_hash(extract_code_ir(c)) for c in (one, moved, other)]
    assert h[0] == h[1] != h[2]
    assert mmsb.code_hash(plain) == mmsb.code_hash(plain.__code__)


def test_callables_without_python_code_are_refused() -> None:
    for obj in (len, print, object(), 3):
        with pytest.raises(mmsb.InvalidArgumentError, match="no Python code"):
            mmsb.serialize_code_ir(obj)


# -- syntax trees -----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [f for f in SAMPLES if inspect.isfunction(f)], ids=_ids)
def test_ast_round_trip(fn: Any) -> None:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    blob = mmsb.serialize_ast(tree)
    assert blob[:8] == AST_MAGIC
    back = mmsb.deserialize_ast(blob)
    assert ast.dump(back, include_attributes=True) == ast.dump(tree, include_attributes=True)
    assert mmsb.serialize_ast(back) == blob


def test_ast_decoder_builds_only_ast_nodes() -> None:
    body = {"_": "Module", "f": {"body": {"_": "[]", "l": []}, "type_ignores": {"_": "[]", "l": []}},
            "p": [None, None, None, None]}
    ok = _frame(AST_MAGIC, body)
    assert isinstance(mmsb.deserialize_ast(ok), ast.Module)
    for kind in ("literal_eval", "parse", "PyCF_ONLY_AST", "NodeVisitor", "_const_node_type_names"):
        bad = dict(body, _=kind)
        with pytest.raises(mmsb.SerializationError, match="not a node class"):
            mmsb.deserialize_ast(_frame(AST_MAGIC, bad))
    extra = {"_": "Module", "f": {"evil": {"_": "v", "v": ["n"]}}, "p": [None] * 4}
    with pytest.raises(mmsb.SerializationError, match="does not define"):
        mmsb.deserialize_ast(_frame(AST_MAGIC, extra))


# -- damaged and crafted bytes ------------------------------------------------------------------

def _frame(magic: bytes, body_obj: Any, version: int = 1) -> bytes:
    body = msgpack.packb(body_obj, use_bin_type=True)
    return struct.pack("<8sHHII", magic, version, 0, len(body), crc32c.crc32c(body)) + body


def test_header_damage_is_refused_with_the_reason() -> None:
    blob = mmsb.serialize_code_ir(plain)
    cases = {
        "bad magic": b"XXXXXXXX" + blob[8:],
        "unsupported version": blob[:8] + struct.pack("<H", 9) + blob[10:],
        "truncated": blob[:-3],
        "checksum": blob[:-1] + bytes([blob[-1] ^ 1]),
        "shorter than its": blob[:10],
    }
    for reason, bad in cases.items():
        with pytest.raises(mmsb.SerializationError, match=reason.split()[0]):
            mmsb.deserialize_code_ir(bad)
    with pytest.raises(mmsb.SerializationError):
        mmsb.deserialize_code_ir("not bytes")  # type: ignore[arg-type]
    with pytest.raises(mmsb.SerializationError, match="bad magic"):
        mmsb.deserialize_code_ir(mmsb.serialize_ast(ast.parse("x = 1")))


def test_crafted_bodies_with_valid_checksums_are_refused() -> None:
    good = msgpack.unpackb(mmsb.serialize_code_ir(plain)[20:], raw=False)
    variants = []
    v = dict(good)
    v.pop("names")
    variants.append(v)
    variants.append(dict(good, argcount=-1))
    variants.append(dict(good, consts=[["?", 1]]))
    variants.append(dict(good, consts=[["I", "zz"]]))
    variants.append(dict(good, instructions=[[0, 999, "X", None, "", [None] * 4, False]]))
    variants.append(dict(good, varnames=[1, 2]))
    variants.append(dict(good, code="text"))
    deep: Any = ["n"]
    for _ in range(300):
        deep = ["t", [deep]]
    variants.append(dict(good, consts=[deep]))
    variants.append([1, 2, 3])
    for body in variants:
        with pytest.raises(mmsb.SerializationError):
            mmsb.deserialize_code_ir(_frame(IR_MAGIC, body))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_damage_only_ever_raises_serialization_error(data: st.DataObject) -> None:
    blob = bytearray(mmsb.serialize_code_ir(pattern_matching))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        ir = mmsb.deserialize_code_ir(bytes(blob[:cut]))
    except mmsb.SerializationError:
        return
    assert isinstance(ir, CodeIR)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_bodies_with_valid_checksums_never_escape(data: st.DataObject) -> None:
    good = msgpack.unpackb(mmsb.serialize_code_ir(plain)[20:], raw=False)
    key = data.draw(st.sampled_from(sorted(good)))
    value = data.draw(st.recursive(
        st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=5)
        | st.binary(max_size=5),
        lambda inner: st.lists(inner, max_size=4), max_leaves=10))
    try:
        mmsb.deserialize_code_ir(_frame(IR_MAGIC, dict(good, **{key: value})))
    except mmsb.SerializationError:
        pass
