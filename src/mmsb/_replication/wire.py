"""What replication keeps in Redis and in a bus directory: key names, the stream entry
that carries one log frame, the manifest of a published checkpoint, and ``DIR/REPL``
(this directory's role and term). docs/SerializationSpec.md §19 has every field.

Keys, under ``mmsb:<bus id, 16 hex digits>:``::

    term            the current term (an integer, INCR'd by each new leader)
    lease           "<term>:<node>" of the leader, with an expiry (PX)
    terms           hash: term -> first LSN that term's leader logged
    log:<term>      stream of that term's frames, entry id "<last LSN>-0", field "f"
    ckpts           sorted set: checkpoint manifests, scored by their LSN
    ck:<term>:<lsn>:<nonce>:<i>  a published checkpoint's bytes, chunk i
    head            hash: lsn, term, time (ns) of the newest shipped frame
    followers       hash: node -> "<lsn>:<term>:<time ns>:<path>"
    acks            stream of follower acknowledgements: node, term, lsn
    ckreq           a follower's request for a fresh checkpoint (its LSN), short-lived
    promote         a request that one follower take over ("<node>" or "best")
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .._storage import fsops
from .._storage.codec import crc32c
from ..errors import InvalidArgumentError, SerializationError

__all__ = ["Keys", "Entry", "encode_entry", "decode_entry", "Manifest", "encode_manifest",
           "decode_manifest", "RoleFile", "read_role", "write_role", "ENTRY_MAGIC",
           "MANIFEST_MAGIC", "ROLE_MAGIC", "LEADER", "FOLLOWER", "new_node_id", "check_node"]

ENTRY_MAGIC = b"MMSBREP\0"
ENTRY_VERSION = 1
_ENTRY = struct.Struct("<8sHHQQQQQ")  # magic, version, flags, bus, term, first, last, time
ENTRY_HEAD = _ENTRY.size + 4
MANIFEST_MAGIC = b"MMSBRCK\0"
MANIFEST_VERSION = 1
_MANIFEST = struct.Struct("<8sHHQQQQQII")  # magic, version, flags, bus, term, lsn, nonce,
#                                           size, chunks, crc32c of the whole checkpoint
MANIFEST_SIZE = _MANIFEST.size + 4
ROLE_MAGIC = b"MMSBREPL"
ROLE_VERSION = 1
_ROLE = struct.Struct("<8sHHQ16sH")  # magic, version, role, term, node, URL length
_U32 = struct.Struct("<I")
LEADER = 1
FOLLOWER = 2
CHUNK = 4 << 20
"""Bytes per published checkpoint chunk (Redis strings stay far below their limit)."""
MAX_CHECKPOINT = 1 << 40
"""Largest published checkpoint a manifest may declare (at most 262,144 chunks)."""


def new_node_id() -> str:
    """A random node name: 16 hex digits."""
    return secrets.token_hex(8)


_NODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_node(node: object) -> str:
    """A node name: 1 to 16 characters of letters, digits, ``_``, ``.`` and ``-``.

    Raises:
        InvalidArgumentError: anything else.
    """
    if not isinstance(node, str) or not 1 <= len(node) <= 16 or not set(node) <= _NODE_CHARS:
        raise InvalidArgumentError(f"a node name is 1 to 16 letters, digits, '_', '.' or '-', "
                                   f"not {node!r}")
    return node


class Keys:
    """The Redis key names of one bus."""

    def __init__(self, bus_id: int) -> None:
        p = f"mmsb:{bus_id:016x}:"
        self.prefix = p
        self.term = p + "term"
        self.lease = p + "lease"
        self.terms = p + "terms"
        self.ckpts = p + "ckpts"
        self.head = p + "head"
        self.followers = p + "followers"
        self.acks = p + "acks"
        self.ckreq = p + "ckreq"
        self.promote = p + "promote"

    def log(self, term: int) -> str:
        return f"{self.prefix}log:{term}"

    def chunk(self, man: Manifest, i: int) -> str:
        return f"{self.prefix}ck:{man.term}:{man.lsn}:{man.nonce:016x}:{i}"


@dataclass(frozen=True)
class Entry:
    """One stream entry: log frames (WAL framing, each with its own CRC) of one term,
    holding the records ``first_lsn`` … ``last_lsn``."""

    bus_id: int
    term: int
    first_lsn: int
    last_lsn: int
    time_ns: int
    frame: memoryview


def encode_entry(bus_id: int, term: int, first: int, last: int, frame: bytes,
                 time_ns: int | None = None) -> bytes:
    head = _ENTRY.pack(ENTRY_MAGIC, ENTRY_VERSION, 0, bus_id, term, first, last,
                       time.time_ns() if time_ns is None else time_ns)
    return head + _U32.pack(crc32c(head)) + frame


def decode_entry(raw: bytes) -> Entry:
    """Check an entry's header (magic, version, CRC, LSN order); the frame inside is
    checked by the WAL framing when it is read.

    Raises:
        SerializationError: a damaged or foreign entry.
    """
    if len(raw) < ENTRY_HEAD:
        raise SerializationError(f"a replication entry of {len(raw)} bytes is shorter than "
                                 f"its {ENTRY_HEAD}-byte header")
    magic, version, _flags, bus, term, first, last, ts = _ENTRY.unpack_from(raw, 0)
    if magic != ENTRY_MAGIC:
        raise SerializationError("a stream entry is not an MMSB replication entry")
    if crc32c(memoryview(raw)[: _ENTRY.size]) != _U32.unpack_from(raw, _ENTRY.size)[0]:
        raise SerializationError("a replication entry's header fails its checksum")
    if version != ENTRY_VERSION:
        raise SerializationError(f"replication entry version {version} is not supported "
                                 f"(this build reads {ENTRY_VERSION})")
    if not 1 <= first <= last:
        raise SerializationError(f"a replication entry holds LSNs {first}..{last}")
    return Entry(bus, term, first, last, ts, memoryview(raw)[ENTRY_HEAD:])


@dataclass(frozen=True)
class Manifest:
    """A published checkpoint: whose, of which term, at which LSN, how it is chunked."""

    bus_id: int
    term: int
    lsn: int
    nonce: int
    """Random: two publications at one LSN (a leader asked twice) never share chunks."""
    size: int
    chunks: int
    crc: int


def encode_manifest(m: Manifest) -> bytes:
    head = _MANIFEST.pack(MANIFEST_MAGIC, MANIFEST_VERSION, 0, m.bus_id, m.term, m.lsn,
                          m.nonce, m.size, m.chunks, m.crc)
    return head + _U32.pack(crc32c(head))


def decode_manifest(raw: bytes) -> Manifest:
    """Raises SerializationError for a damaged, foreign or inconsistent manifest."""
    if len(raw) != MANIFEST_SIZE:
        raise SerializationError(f"a checkpoint manifest of {len(raw)} bytes, not "
                                 f"{MANIFEST_SIZE}")
    magic, version, _flags, bus, term, lsn, nonce, size, chunks, crc = _MANIFEST.unpack_from(
        raw, 0)
    if magic != MANIFEST_MAGIC or crc32c(raw[: _MANIFEST.size]) != _U32.unpack_from(
            raw, _MANIFEST.size)[0]:
        raise SerializationError("a checkpoint manifest is damaged or not MMSB's")
    if version != MANIFEST_VERSION:
        raise SerializationError(f"checkpoint manifest version {version} is not supported")
    if size > MAX_CHECKPOINT:
        raise SerializationError(f"a checkpoint manifest declares {size} bytes, more than "
                                 f"{MAX_CHECKPOINT}")
    if chunks != max(1, -(-size // CHUNK)):
        raise SerializationError(f"a checkpoint manifest says {size} bytes in {chunks} chunks")
    return Manifest(bus, term, lsn, nonce, size, chunks, crc)


@dataclass(frozen=True)
class RoleFile:
    """``DIR/REPL``: this directory's part in replication."""

    role: int
    term: int
    node: str
    url: str
    """The Redis URL it replicates through (``mmsb promote PATH`` reads it)."""


def read_role(root: Path) -> RoleFile | None:
    """``DIR/REPL``, or None where there is none.

    Raises:
        SerializationError: it is damaged, foreign, or not a regular file.
    """
    path = root / "REPL"
    if not os.path.lexists(path):
        return None
    try:
        raw = fsops.read_all(path)
    except OSError as exc:
        raise SerializationError(f"cannot read the replication role file ({exc.strerror or exc})",
                                 path=path) from None
    if len(raw) < _ROLE.size + 4:
        raise SerializationError(f"the replication role file is {len(raw)} bytes, shorter "
                                 f"than its {_ROLE.size + 4}-byte minimum", path=path)
    magic, version, role, term, node, url_len = _ROLE.unpack_from(raw, 0)
    end = _ROLE.size + url_len
    if (magic != ROLE_MAGIC or len(raw) != end + 4
            or crc32c(raw[:end]) != _U32.unpack_from(raw, end)[0]):
        raise SerializationError("the replication role file is damaged", path=path, offset=0)
    if version != ROLE_VERSION:
        raise SerializationError(f"replication role file version {version} is not supported",
                                 path=path, offset=8)
    if role not in (LEADER, FOLLOWER):
        raise SerializationError(f"the replication role file names role {role}", path=path)
    try:
        name = node.rstrip(b"\0").decode("ascii")
        url = raw[_ROLE.size:end].decode("utf-8")
    except UnicodeDecodeError:
        raise SerializationError("the replication role file's node name or URL is not text",
                                 path=path) from None
    return RoleFile(role, term, name, url)


def write_role(root: Path, role: RoleFile) -> None:
    """Replace ``DIR/REPL`` atomically (temporary file, fsync, rename, fsync the folder).

    Raises:
        OSError: the disk refused (the old file, if any, stays).
    """
    node = role.node.encode("ascii")
    url = role.url.encode("utf-8")  # at most config.MAX_URL bytes (validated before)
    head = _ROLE.pack(ROLE_MAGIC, ROLE_VERSION, role.role, role.term, node.ljust(16, b"\0"),
                      len(url)) + url
    fsops.replace_small_file(root, "REPL", head + _U32.pack(crc32c(head)))
