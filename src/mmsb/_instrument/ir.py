"""Code artefacts as data: a function's or module's bytecode IR, its AST and its source,
encoded with msgpack in documented, checksummed layouts (docs/SerializationSpec.md,
"Code artefacts").

Decoding gives plain data (:class:`CodeIR`, :class:`Instr`, tuples, and ``ast`` nodes
built field by field): nothing decoded is ever compiled, executed or turned back into a
code object. Encoding is deterministic: the same code gives the same bytes, so a code
page changes only when the code does.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import re
import struct
import sys
import types
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import msgpack

from ..errors import InvalidArgumentError, SerializationError
from .trampoline import function_of, real_code

__all__ = [
    "CodeIR", "Instr", "IR_MAGIC", "AST_MAGIC", "IR_VERSION", "AST_VERSION",
    "code_of", "extract_code_ir", "serialize_code_ir", "deserialize_code_ir",
    "serialize_ast", "deserialize_ast", "code_hash", "ir_code_hash", "MAX_ARTEFACT_BYTES",
]

IR_MAGIC = b"MMSBCIR\x00"
AST_MAGIC = b"MMSBAST\x00"
IR_VERSION = 1
AST_VERSION = 1
_HEADER = struct.Struct("<8sHHII")
"""magic, version, flags (0), body length, CRC32C of the body."""
MAX_ARTEFACT_BYTES = 64 << 20
"""Largest body a decoder accepts (a bound on what one decode may allocate)."""
MAX_DEPTH = 200
"""Deepest nesting of code objects, constants or AST nodes a decoder accepts."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# CO_* flag bits and their names, as the interpreter defines them (inspect's table).
_FLAG_NAMES = tuple(sorted(dis.COMPILER_FLAG_NAMES.items()))


@dataclass(frozen=True, slots=True)
class Instr:
    """One bytecode instruction, as ``dis`` reads it."""

    offset: int
    """Byte offset in ``co_code``."""
    opcode: int
    opname: str
    arg: int | None
    """The raw argument (None for instructions without one)."""
    argrepr: str
    """What the argument means, as ``dis`` prints it (addresses removed)."""
    positions: tuple[int | None, int | None, int | None, int | None]
    """(lineno, end_lineno, col_offset, end_col_offset); None where unknown."""
    is_jump_target: bool


@dataclass(frozen=True, slots=True)
class CodeIR:
    """A code object as data: every field of it, its instructions decoded, nested code
    objects (functions, comprehensions, class bodies) as nested :class:`CodeIR`
    constants. Never turned back into a code object."""

    name: str
    qualname: str
    filename: str
    firstlineno: int
    argcount: int
    posonlyargcount: int
    kwonlyargcount: int
    nlocals: int
    stacksize: int
    flags: int
    """``co_flags``; :attr:`flag_names` spells them."""
    varnames: tuple[str, ...]
    freevars: tuple[str, ...]
    cellvars: tuple[str, ...]
    names: tuple[str, ...]
    consts: tuple[Any, ...]
    """None, bool, int, float, complex, str, bytes, Ellipsis, tuples and frozensets of
    those, and nested :class:`CodeIR`."""
    code: bytes
    """``co_code``: the unspecialised bytecode."""
    linetable: bytes
    exceptiontable: bytes
    instructions: tuple[Instr, ...]
    python: tuple[int, int]
    """The interpreter version (major, minor) whose bytecode this is."""

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(name for bit, name in _FLAG_NAMES if self.flags & bit)

    def walk(self) -> list[CodeIR]:
        """This code and every code nested in its constants, depth first."""
        out: list[CodeIR] = []
        stack: list[CodeIR] = [self]
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(reversed([k for k in c.consts if isinstance(k, CodeIR)]))
        return out


# -- finding the code of a callable ------------------------------------------------------

def code_of(obj: Any) -> types.CodeType | None:
    """The code object behind a function, method, ``staticmethod``/``classmethod``,
    partial, ``__wrapped__`` chain, callable instance or code object (None for builtins
    and other callables without Python code). A function whose calls are recorded
    through a trampoline gives its own code, not the trampoline."""
    if isinstance(obj, types.CodeType):
        return real_code(obj)
    fn = function_of(obj)
    return None if fn is None else real_code(fn.__code__)


def extract_code_ir(obj: Any) -> CodeIR:
    """The :class:`CodeIR` of a function, method, code object (or anything
    :func:`code_of` finds code in).

    Raises:
        InvalidArgumentError: ``obj`` has no Python code.
    """
    code = code_of(obj)
    if code is None:
        raise InvalidArgumentError(
            f"{type(obj).__name__} {getattr(obj, '__qualname__', obj)!r} has no Python code "
            "(a builtin or C function); pass a function, method or code object")
    return _ir(code, 0)


def _ir(code: types.CodeType, depth: int) -> CodeIR:
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"code nested deeper than {MAX_DEPTH} levels")
    instrs = []
    for ins in dis.get_instructions(code):
        pos = ins.positions
        positions = (None, None, None, None) if pos is None else (
            pos.lineno, pos.end_lineno, pos.col_offset, pos.end_col_offset)
        instrs.append(Instr(ins.offset, ins.opcode, ins.opname, ins.arg,
                            _ADDRESS.sub("", ins.argrepr), positions, bool(ins.is_jump_target)))
    return CodeIR(
        code.co_name, code.co_qualname, code.co_filename, code.co_firstlineno,
        code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_nlocals,
        code.co_stacksize, code.co_flags, tuple(code.co_varnames), tuple(code.co_freevars),
        tuple(code.co_cellvars), tuple(code.co_names),
        tuple(_const(c, depth) for c in code.co_consts), bytes(code.co_code),
        bytes(code.co_linetable), bytes(code.co_exceptiontable), tuple(instrs),
        (sys.version_info.major, sys.version_info.minor))


def _const(value: Any, depth: int) -> Any:
    if isinstance(value, types.CodeType):
        return _ir(value, depth + 1)
    if isinstance(value, tuple):
        return tuple(_const(v, depth + 1) for v in value)
    if isinstance(value, frozenset):
        return frozenset(_const(v, depth + 1) for v in value)
    return value


# -- encoding ----------------------------------------------------------------------------
# Tagged values: msgpack alone cannot tell a tuple from a list or hold a complex, a big
# int, Ellipsis or a frozenset, so constants go as [tag, value].

def _enc_value(v: Any, depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"constants nested deeper than {MAX_DEPTH} levels")
    if v is None:
        return ["n"]
    if v is Ellipsis:
        return ["e"]
    if isinstance(v, bool):
        return ["b", v]
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 64):
            return ["i", v]
        return ["I", format(v, "x")]
    if isinstance(v, float):
        return ["f", v]
    if isinstance(v, complex):
        return ["c", v.real, v.imag]
    if isinstance(v, str):
        return ["s", v]
    if isinstance(v, bytes):
        return ["y", v]
    if isinstance(v, tuple):
        return ["t", [_enc_value(x, depth + 1) for x in v]]
    if isinstance(v, frozenset):
        # Sorted by encoding, so equal sets give equal bytes.
        items = [_enc_value(x, depth + 1) for x in v]
        items.sort(key=lambda e: msgpack.packb(e, use_bin_type=True))
        return ["z", items]
    if isinstance(v, CodeIR):
        return ["k", _enc_code(v, depth + 1)]
    # A constant of a kind the compiler does not make today: kept as its text.
    return ["r", type(v).__name__, _ADDRESS.sub("", repr(v))]


def _enc_code(c: CodeIR, depth: int) -> dict[str, Any]:
    return {
        "name": c.name, "qualname": c.qualname, "filename": c.filename,
        "firstlineno": c.firstlineno, "argcount": c.argcount,
        "posonlyargcount": c.posonlyargcount, "kwonlyargcount": c.kwonlyargcount,
        "nlocals": c.nlocals, "stacksize": c.stacksize, "flags": c.flags,
        "varnames": list(c.varnames), "freevars": list(c.freevars),
        "cellvars": list(c.cellvars), "names": list(c.names),
        "consts": [_enc_value(k, depth + 1) for k in c.consts],
        "code": c.code, "linetable": c.linetable, "exceptiontable": c.exceptiontable,
        "instructions": [[i.offset, i.opcode, i.opname, i.arg, i.argrepr, list(i.positions),
                          i.is_jump_target] for i in c.instructions],
        "python": list(c.python),
    }


def _frame(magic: bytes, version: int, body: bytes) -> bytes:
    if len(body) > MAX_ARTEFACT_BYTES:
        raise InvalidArgumentError(
            f"the encoded artefact is {len(body)} bytes, over the limit of {MAX_ARTEFACT_BYTES}")
    return _HEADER.pack(magic, version, 0, len(body), _crc32c.crc32c(body)) + body


def _unframe(blob: Any, magic: bytes, version: int, what: str) -> bytes:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SerializationError(f"{what} must be bytes, not {type(blob).__name__}")
    raw = bytes(blob)
    if len(raw) < _HEADER.size:
        raise SerializationError(f"{what}: {len(raw)} bytes is shorter than its "
                                 f"{_HEADER.size}-byte header", offset=0)
    got_magic, got_version, flags, length, crc = _HEADER.unpack_from(raw)
    if got_magic != magic:
        raise SerializationError(f"{what}: bad magic {got_magic!r} (expected {magic!r})", offset=0)
    if got_version != version:
        raise SerializationError(f"{what}: unsupported version {got_version} (this build "
                                 f"reads version {version})", offset=8)
    if flags != 0:
        raise SerializationError(f"{what}: unknown flags {flags:#x}", offset=10)
    if length > MAX_ARTEFACT_BYTES:
        raise SerializationError(f"{what}: body of {length} bytes is over the limit of "
                                 f"{MAX_ARTEFACT_BYTES}", offset=12)
    body = raw[_HEADER.size:]
    if len(body) != length:
        raise SerializationError(f"{what}: the header says {length} body bytes, "
                                 f"{len(body)} follow (truncated or padded)", offset=12)
    if _crc32c.crc32c(body) != crc:
        raise SerializationError(f"{what}: checksum mismatch (the bytes are damaged)",
                                 offset=_HEADER.size)
    return body


def _unpack(body: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=MAX_ARTEFACT_BYTES, max_str_len=MAX_ARTEFACT_BYTES,
                               max_array_len=1 << 22, max_map_len=1 << 16,
                               max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise SerializationError(f"{what}: body is not valid msgpack ({exc})",
                                 offset=_HEADER.size) from None


def serialize_code_ir(obj: Any) -> bytes:
    """The IR of a function, method, code object or :class:`CodeIR` as bytes: a 20-byte
    header (magic ``MMSBCIR\\0``, version, flags, body length, CRC32C) and a msgpack
    body (docs/SerializationSpec.md). Deterministic. O(instructions).

    Raises:
        InvalidArgumentError: ``obj`` has no Python code.
    """
    ir = obj if isinstance(obj, CodeIR) else extract_code_ir(obj)
    body = msgpack.packb(_enc_code(ir, 0), use_bin_type=True)
    return _frame(IR_MAGIC, IR_VERSION, body)


def deserialize_code_ir(blob: bytes | bytearray | memoryview) -> CodeIR:
    """Decode :func:`serialize_code_ir` bytes into a :class:`CodeIR` (plain data; never
    executed, never a code object).

    Raises:
        SerializationError: bad magic, unsupported version, truncation, checksum
            mismatch, or a body that is not the documented layout.
    """
    body = _unframe(blob, IR_MAGIC, IR_VERSION, "code IR")
    return _dec_code(_unpack(body, "code IR"), 0)


class _Bad(Exception):
    pass


def _want(cond: bool, why: str) -> None:
    if not cond:
        raise _Bad(why)


def _str(v: Any, what: str) -> str:
    _want(isinstance(v, str), f"{what} is not a string")
    return str(v)


def _int(v: Any, what: str, lo: int = 0, hi: int = (1 << 62)) -> int:
    _want(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
          f"{what} is not an int from {lo} to {hi}")
    return int(v)


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what, -(1 << 31), 1 << 62)


def _strs(v: Any, what: str) -> tuple[str, ...]:
    _want(isinstance(v, list), f"{what} is not a list")
    return tuple(_str(x, what) for x in v)


def _bytes(v: Any, what: str) -> bytes:
    _want(isinstance(v, bytes), f"{what} is not bytes")
    return bytes(v)


_CODE_KEYS = frozenset((
    "name", "qualname", "filename", "firstlineno", "argcount", "posonlyargcount",
    "kwonlyargcount", "nlocals", "stacksize", "flags", "varnames", "freevars", "cellvars",
    "names", "consts", "code", "linetable", "exceptiontable", "instructions", "python"))


def _dec_code(m: Any, depth: int) -> CodeIR:
    try:
        return _dec_code_inner(m, depth)
    except _Bad as exc:
        raise SerializationError(f"code IR: {exc}") from None


def _dec_code_inner(m: Any, depth: int) -> CodeIR:
    _want(depth <= MAX_DEPTH, f"code nested deeper than {MAX_DEPTH} levels")
    _want(isinstance(m, dict) and set(m) == _CODE_KEYS, "a code map lacks or adds fields")
    instrs = []
    raw_instrs = m["instructions"]
    _want(isinstance(raw_instrs, list), "instructions is not a list")
    for row in raw_instrs:
        _want(isinstance(row, list) and len(row) == 7, "an instruction is not a 7-item list")
        pos = row[5]
        _want(isinstance(pos, list) and len(pos) == 4, "positions is not a 4-item list")
        _want(isinstance(row[6], bool), "is_jump_target is not a bool")
        instrs.append(Instr(_int(row[0], "offset"), _int(row[1], "opcode", 0, 255),
                            _str(row[2], "opname"), _opt_int(row[3], "arg"),
                            _str(row[4], "argrepr"),
                            (_opt_int(pos[0], "lineno"), _opt_int(pos[1], "end_lineno"),
                             _opt_int(pos[2], "col_offset"), _opt_int(pos[3], "end_col_offset")),
                            row[6]))
    py = m["python"]
    _want(isinstance(py, list) and len(py) == 2, "python is not [major, minor]")
    consts = m["consts"]
    _want(isinstance(consts, list), "consts is not a list")
    return CodeIR(
        _str(m["name"], "name"), _str(m["qualname"], "qualname"),
        _str(m["filename"], "filename"), _int(m["firstlineno"], "firstlineno"),
        _int(m["argcount"], "argcount"), _int(m["posonlyargcount"], "posonlyargcount"),
        _int(m["kwonlyargcount"], "kwonlyargcount"), _int(m["nlocals"], "nlocals"),
        _int(m["stacksize"], "stacksize"), _int(m["flags"], "flags", 0, (1 << 32) - 1),
        _strs(m["varnames"], "varnames"), _strs(m["freevars"], "freevars"),
        _strs(m["cellvars"], "cellvars"), _strs(m["names"], "names"),
        tuple(_dec_value(k, depth + 1) for k in consts), _bytes(m["code"], "code"),
        _bytes(m["linetable"], "linetable"), _bytes(m["exceptiontable"], "exceptiontable"),
        tuple(instrs), (_int(py[0], "python major", 0, 255), _int(py[1], "python minor", 0, 255)))


def _dec_value(e: Any, depth: int) -> Any:
    _want(depth <= MAX_DEPTH, f"constants nested deeper than {MAX_DEPTH} levels")
    _want(isinstance(e, list) and bool(e) and isinstance(e[0], str),
          "a constant is not a tagged list")
    tag, n = e[0], len(e)
    if tag == "n" and n == 1:
        return None
    if tag == "e" and n == 1:
        return Ellipsis
    if tag == "b" and n == 2 and isinstance(e[1], bool):
        return e[1]
    if tag == "i" and n == 2 and isinstance(e[1], int) and not isinstance(e[1], bool):
        return e[1]
    if tag == "I" and n == 2 and isinstance(e[1], str) and 0 < len(e[1]) <= 1 << 20:
        text = e[1]
        body = text[1:] if text.startswith("-") else text
        _want(bool(body) and all(ch in "0123456789abcdef" for ch in body), "a big int is not hex")
        return int(text, 16)
    if tag == "f" and n == 2 and isinstance(e[1], float):
        return e[1]
    if tag == "c" and n == 3 and isinstance(e[1], float) and isinstance(e[2], float):
        return complex(e[1], e[2])
    if tag == "s" and n == 2 and isinstance(e[1], str):
        return e[1]
    if tag == "y" and n == 2 and isinstance(e[1], bytes):
        return e[1]
    if tag == "t" and n == 2 and isinstance(e[1], list):
        return tuple(_dec_value(x, depth + 1) for x in e[1])
    if tag == "z" and n == 2 and isinstance(e[1], list):
        return frozenset(_dec_value(x, depth + 1) for x in e[1])
    if tag == "k" and n == 2:
        return _dec_code_inner(e[1], depth + 1)
    if tag == "r" and n == 3 and isinstance(e[1], str) and isinstance(e[2], str):
        return OpaqueConst(e[1], e[2])
    raise _Bad(f"unknown constant tag {tag!r} with {n - 1} value(s)")


@dataclass(frozen=True, slots=True)
class OpaqueConst:
    """A constant of a kind the encoder keeps as text (none the compiler makes today)."""

    type_name: str
    text: str


# -- the behaviour hash ------------------------------------------------------------------

def ir_code_hash(ir: CodeIR) -> str:
    """A SHA-256 (hex) of what the code does: bytecode, exception table, constants
    (nested code by its own hash), names, variables, flags and argument counts; not
    positions, line numbers or the file name, so moving a function within its file
    leaves the hash as it was."""
    h = hashlib.sha256()
    h.update(msgpack.packb(_behaviour(ir, 0), use_bin_type=True))
    return h.hexdigest()


def _behaviour(c: CodeIR, depth: int) -> list[Any]:
    consts = [["k", _behaviour(k, depth + 1)] if isinstance(k, CodeIR) else _enc_value(k, depth)
              for k in c.consts]
    return [c.name, c.code, c.exceptiontable, consts, list(c.names), list(c.varnames),
            list(c.freevars), list(c.cellvars), c.flags, c.argcount, c.posonlyargcount,
            c.kwonlyargcount, list(c.python)]


def code_hash(obj: Any) -> str:
    """:func:`ir_code_hash` of a callable's (or code object's) code.

    Raises:
        InvalidArgumentError: ``obj`` has no Python code.
    """
    return ir_code_hash(extract_code_ir(obj))


# -- AST ---------------------------------------------------------------------------------

def _enc_ast(node: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"syntax tree nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.AST):
        fields = {}
        for name in node._fields:
            fields[name] = _enc_ast(getattr(node, name, None), depth + 1)
        attrs = [getattr(node, a, None) for a in ("lineno", "col_offset", "end_lineno",
                                                  "end_col_offset")]
        return {"_": type(node).__name__, "f": fields, "p": attrs}
    if isinstance(node, list):
        return {"_": "[]", "l": [_enc_ast(x, depth + 1) for x in node]}
    return {"_": "v", "v": _enc_value(node, depth)}


def serialize_ast(tree: ast.AST) -> bytes:
    """A syntax tree as bytes: a 20-byte header (magic ``MMSBAST\\0``) and a msgpack body
    of nested node maps (docs/SerializationSpec.md). Deterministic."""
    if not isinstance(tree, ast.AST):
        raise InvalidArgumentError(f"serialize_ast takes an ast.AST, not {type(tree).__name__}")
    return _frame(AST_MAGIC, AST_VERSION, msgpack.packb(_enc_ast(tree, 0), use_bin_type=True))


def deserialize_ast(blob: bytes | bytearray | memoryview) -> ast.AST:
    """Decode :func:`serialize_ast` bytes into ``ast`` nodes, built field by field from
    the node classes of the ``ast`` module (data only: nothing is compiled).

    Raises:
        SerializationError: damage, or a node or field the ``ast`` module does not have.
    """
    body = _unframe(blob, AST_MAGIC, AST_VERSION, "syntax tree")
    try:
        node = _dec_ast(_unpack(body, "syntax tree"), 0)
    except _Bad as exc:
        raise SerializationError(f"syntax tree: {exc}") from None
    if not isinstance(node, ast.AST):
        raise SerializationError("syntax tree: the root is not a node")
    return node


def _dec_ast(m: Any, depth: int) -> Any:
    _want(depth <= MAX_DEPTH, f"syntax tree nested deeper than {MAX_DEPTH} levels")
    _want(isinstance(m, dict) and isinstance(m.get("_"), str), "a node is not a tagged map")
    kind = m["_"]
    if kind == "[]":
        _want(set(m) == {"_", "l"} and isinstance(m["l"], list), "a list node is malformed")
        return [_dec_ast(x, depth + 1) for x in m["l"]]
    if kind == "v":
        _want(set(m) == {"_", "v"}, "a value node is malformed")
        return _dec_value(m["v"], depth + 1)
    cls = getattr(ast, kind, None)
    _want(isinstance(cls, type) and issubclass(cls, ast.AST) and not kind.startswith("_"),
          f"{kind!r} is not a node class of the ast module")
    _want(set(m) == {"_", "f", "p"} and isinstance(m["f"], dict), f"node {kind} is malformed")
    fields = m["f"]
    known: tuple[str, ...] = getattr(cls, "_fields", ())
    _want(set(fields) <= set(known), f"node {kind} has fields it does not define")
    node: Any = cls()  # type: ignore[misc]
    for name, value in fields.items():
        setattr(node, name, _dec_ast(value, depth + 1))
    pos = m["p"]
    _want(isinstance(pos, list) and len(pos) == 4, f"node {kind} positions are malformed")
    for attr, value in zip(("lineno", "col_offset", "end_lineno", "end_col_offset"), pos,
                           strict=True):
        if value is not None:
            setattr(node, attr, _int(value, attr, -1, 1 << 40))
    return node
