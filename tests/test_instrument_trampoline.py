"""Trampolines, the call hook before 3.12: only the instrumented functions change, and
only their ``__code__``; what reads them (signature, source, introspection, code
capture) sees them as they were; disabling gives each its own code object back."""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Any

import pytest

import mmsb
from instrument_helpers import ModuleDir, make_modules, make_state
from mmsb._instrument import trampoline
from mmsb._instrument.calls import MONITORING
from mmsb._instrument.ir import code_of, extract_code_ir, ir_code_hash
from mmsb._instrument.manager import manager_of

pytestmark = pytest.mark.skipif(MONITORING, reason="3.12+ records through sys.monitoring")

state_fixture = pytest.fixture(name="state")(make_state)
modules_fixture = pytest.fixture(name="modules")(make_modules)


def shaped(a: int, b: int = 2, /, c: str = "c", *rest: int, d: float, e: Any = None,
           **more: Any) -> tuple[Any, ...]:
    """Every kind of parameter."""
    return a, b, c, rest, d, e, more


def gen(n: int) -> Any:
    yield from range(n)


async def coro(x: int) -> int:
    return x


@types.coroutine
def old_style() -> Any:
    yield None
    return 7


class Base:
    def hello(self) -> str:
        return "base"


class Child(Base):
    def hello(self) -> str:
        return "child+" + super().hello()

    @staticmethod
    def static(x: int) -> int:
        return x

    @classmethod
    def make(cls) -> Child:
        return cls()


def plain(x: int) -> int:
    return x


FUNCTIONS = (shaped, gen, coro, old_style, Child.hello, Child.static, Child.make, plain)


def _originals() -> dict[str, Any]:
    return {"codes": [trampoline.function_of(f).__code__ for f in FUNCTIONS],  # type: ignore[union-attr]
            "child": dict(vars(Child)), "module": {k: v for k, v in globals().items()
                                                   if callable(v)}}


def _enable(st: mmsb.MMSBState, fns: tuple[Any, ...] = FUNCTIONS) -> None:
    mmsb.enable_instrumentation(st, mmsb.InstrumentationConfig(functions=fns, calls=True))


def test_only_code_changes_and_disabling_gives_each_its_own_code_back(
        state: mmsb.MMSBState) -> None:
    before = _originals()
    _enable(state)
    now = [trampoline.function_of(f).__code__ for f in FUNCTIONS]  # type: ignore[union-attr]
    assert all(n is not o for n, o in zip(now, before["codes"], strict=True))
    assert [code_of(f) for f in FUNCTIONS] == before["codes"]
    assert trampoline.installed() == len(FUNCTIONS)
    assert dict(vars(Child)) == before["child"]  # the same objects (staticmethod too)
    assert all(globals()[k] is v for k, v in before["module"].items())
    assert sys.getprofile() is None
    mmsb.disable_instrumentation(state)
    after = [trampoline.function_of(f).__code__ for f in FUNCTIONS]  # type: ignore[union-attr]
    assert all(a is o for a, o in zip(after, before["codes"], strict=True))
    assert trampoline.installed() == 0


def test_introspection_sees_the_function_as_it_was(state: mmsb.MMSBState) -> None:
    sig = inspect.signature(shaped)
    source = inspect.getsource(shaped)
    ir_hash = ir_code_hash(extract_code_ir(shaped))
    names = (shaped.__name__, shaped.__qualname__, shaped.__module__, shaped.__doc__,
             shaped.__defaults__, shaped.__kwdefaults__, shaped.__annotations__)

    @functools.wraps(shaped)
    def decorated(*args: Any, **kwargs: Any) -> Any:
        return shaped(*args, **kwargs)

    _enable(state)
    assert inspect.signature(shaped) == sig and inspect.signature(decorated) == sig
    assert decorated.__wrapped__ is shaped and inspect.unwrap(decorated) is shaped
    assert inspect.getsource(shaped) == source
    assert ir_code_hash(extract_code_ir(shaped)) == ir_hash
    assert (shaped.__name__, shaped.__qualname__, shaped.__module__, shaped.__doc__,
            shaped.__defaults__, shaped.__kwdefaults__, shaped.__annotations__) == names
    assert shaped.__code__.co_name == "shaped" and shaped.__code__.co_qualname == "shaped"
    assert inspect.isgeneratorfunction(gen) and inspect.iscoroutinefunction(coro)
    assert not inspect.isgeneratorfunction(plain)
    assert shaped(1, d=4.0) == (1, 2, "c", (), 4.0, None, {})
    assert decorated(1, 3, "x", 5, 6, d=1.0, e=2, z=3) == (1, 3, "x", (5, 6), 1.0, 2, {"z": 3})
    with pytest.raises(TypeError):
        shaped(1)  # d is missing: refused at the call, as before
    with pytest.raises(TypeError):
        shaped(a=1, d=1.0)  # a is positional-only
    assert list(gen(3)) == [0, 1, 2]
    assert Child().hello() == "child+base"  # zero-argument super() (the __class__ cell)
    assert isinstance(Child.make(), Child) and Child.static(4) == 4

    async def use_old_style() -> Any:
        return await old_style()

    coro_obj = use_old_style()
    assert coro_obj.send(None) is None
    with pytest.raises(StopIteration) as stop:
        coro_obj.send(None)
    assert stop.value.value == 7
    mmsb.flush_call_events(state)
    assert len(mmsb.call_events(state)) >= 10


def test_closure_cells_are_shared_with_the_function(state: mmsb.MMSBState) -> None:
    def make() -> tuple[Any, Any]:
        count = 0

        def bump() -> int:
            nonlocal count
            count += 1
            return count

        def peek() -> int:
            return count

        return bump, peek

    bump, peek = make()
    _enable(state, (bump,))
    assert bump.__code__.co_freevars == ("count",)
    assert bump() == 1 and bump() == 2 and peek() == 2
    mmsb.disable_instrumentation(state)
    assert bump() == 3 and peek() == 3


def test_code_set_back_gets_its_trampoline_again(state: mmsb.MMSBState) -> None:
    _enable(state, (plain,))
    own = code_of(plain)
    plain.__code__ = own  # replaces the trampoline with the same code: not a change
    assert mmsb.refresh_code(state) == []
    plain(1)
    mmsb.flush_call_events(state)
    assert len(mmsb.call_events(state)) == 1


def test_a_function_changed_after_disable_is_left_alone(state: mmsb.MMSBState) -> None:
    def other(x: int) -> int:
        return -x

    own = plain.__code__
    _enable(state, (plain,))
    plain.__code__ = other.__code__  # not refreshed: the recorder leaves it as it is
    mmsb.disable_instrumentation(state)
    try:
        assert plain.__code__ is other.__code__ and trampoline.installed() == 0
    finally:
        plain.__code__ = own


def test_an_imported_module_is_recorded_and_a_reload_recaptured(
        state: mmsb.MMSBState, modules: ModuleDir) -> None:
    name = modules.name()
    modules.write(name, """
        def work(x):
            return helper(x) + 1

        def helper(x):
            return x * 2
    """)
    mmsb.enable_instrumentation(state, mmsb.InstrumentationConfig(
        modules=(f"{name}*",), calls=True))
    mod = modules.load(name)
    early = mod.work  # a reference taken right after the import
    assert early(1) == 3
    mod = modules.edit(mod, "x * 2", "x * 3")
    assert mod.work(1) == 4 and early(1) == 4  # early's globals are the module's
    mmsb.flush_call_events(state)
    names = [e.name.split(":")[1] for e in mmsb.call_events(state)]
    assert names == ["helper", "work"] * 3
    mgr = manager_of(state)
    assert mgr is not None
    assert mgr.units[f"{name}:helper"].code is code_of(mod.helper)
    mmsb.disable_instrumentation(state)
    assert trampoline.installed() == 0
    assert code_of(early) is early.__code__ and code_of(mod.work) is mod.work.__code__


def test_an_async_generator_gets_no_trampoline() -> None:
    async def agen() -> Any:
        yield 1

    assert trampoline.kind_of(agen.__code__) is None
    with pytest.raises(ValueError, match="async generator"):
        trampoline.build(agen.__code__, "def f({params}):\n    return None\n", {})


def test_names_that_are_not_identifiers_never_reach_the_generated_text() -> None:
    def f(a: int) -> int:
        return a

    for odd in ("a): pass\ndef g(", "class", "1a"):
        code = f.__code__.replace(co_varnames=(odd,))
        with pytest.raises(ValueError, match="not identifiers"):
            trampoline.build(code, "def f({params}):\n    return None\n", {})


def test_parameters_named_like_the_trampolines_locals(state: mmsb.MMSBState) -> None:
    def make() -> Any:
        _mmsb_t0 = 1

        def odd(_mmsb_tb: int, _mmsb_d: int = 2, *, _mmsb_tb_: int = 3) -> int:
            return _mmsb_tb + _mmsb_d + _mmsb_tb_ + _mmsb_t0

        return odd

    odd = make()
    _enable(state, (odd,))
    assert odd(1) == 7 and odd(1, 1, _mmsb_tb_=1) == 4
    mmsb.flush_call_events(state)
    assert len(mmsb.call_events(state)) == 2


def test_a_traceback_shows_the_def_line_then_the_function(state: mmsb.MMSBState) -> None:
    def failing(x: int) -> int:
        raise ValueError(x)

    first = failing.__code__.co_firstlineno
    _enable(state, (failing,))
    assert {line for _s, _e, line in failing.__code__.co_lines()} == {first}
    with pytest.raises(ValueError) as info:
        failing(1)
    frames = [(e.frame.code.raw, e.lineno + 1) for e in info.traceback]
    assert frames[-2:] == [(failing.__code__, first), (code_of(failing), first + 1)]


def test_a_function_without_a_trampoline_runs_unrecorded(
        state: mmsb.MMSBState, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = trampoline.build

    def refuse_plain(code: types.CodeType, *args: Any, **kwargs: Any) -> types.CodeType:
        if code is plain.__code__:
            raise ValueError("refused for the test")
        return real_build(code, *args, **kwargs)

    own = plain.__code__
    monkeypatch.setattr(trampoline, "build", refuse_plain)
    _enable(state, (plain, Child.static))
    assert plain.__code__ is own and plain(2) == 2 and Child.static(1) == 1
    mgr = manager_of(state)
    assert mgr is not None and any("no trampoline (refused for the test)" in n
                                   for n in mgr.notes)
    mmsb.flush_call_events(state)
    assert [e.name.split(":")[1] for e in mmsb.call_events(state)] == ["Child.static"]
