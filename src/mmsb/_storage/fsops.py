"""Every file-system step of the durable bus, in one place.

The bus never opens, writes, syncs, renames or removes a file except through these
functions, for two reasons:

* **Safety.** Files are opened with ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` and checked
  with ``fstat`` to be regular files, so a symlink, FIFO or device where a bus file
  belongs is refused (never followed, never written through, never waited on). Files
  are created with mode 0600 whatever the umask, and an existing file is narrowed to
  0600 when the bus opens it for writing.
* **Fault injection.** Each step first calls the hook installed with
  :func:`set_fault_hook` (none by default), with the step's name and path. A test hook
  can raise ``OSError`` (ENOSPC, EIO, EROFS …) or end the process at the Nth step, so
  that loops can walk a fault over every step of checkpointing, retention, segment
  rotation and stop. Step names: ``"create"``, ``"open"``, ``"write"``, ``"fsync"``,
  ``"truncate"``, ``"allocate"``, ``"rename"``, ``"unlink"``, ``"fsync_dir"``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SerializationError

__all__ = ["FILE_MODE", "set_fault_hook", "step", "open_regular", "open_regular_stat", "create_exclusive",
           "read_all", "read_fd", "read_private", "write_all", "pwrite_all", "allocate", "fsync", "fdatasync", "truncate", "replace",
           "unlink", "fsync_dir", "HookedWriter", "NotRegularFileError", "process_alive",
           "bus_folder", "read_bus_folder"]

FILE_MODE = 0o600
"""Mode of every file the bus creates (page bytes are not for other users)."""

_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_hook: Callable[[str, str], None] | None = None


class NotRegularFileError(OSError):
    """A path that names a symlink, FIFO, device or directory where a regular file
    belongs."""


def set_fault_hook(hook: Callable[[str, str], None] | None) -> Callable[[str, str], None] | None:
    """Install ``hook(step, path)``, called before every file-system step of the bus
    (None removes it). Returns the previous hook. For tests of faults and crashes.

    Args:
        hook: called with the step's name and the path it acts on; whatever it raises
            is raised by the step.
    """
    global _hook
    previous, _hook = _hook, hook
    return previous


def step(name: str, path: Any) -> None:
    """Announce one file-system step to the fault hook (if any)."""
    hook = _hook
    if hook is not None:
        hook(name, str(path))


_NOT_REGULAR = ("not a regular file (a FIFO, device, directory or other special file "
                "stands where a bus file belongs)")


def open_regular(path: Any, flags: int, *, create: bool = False) -> int:
    """Open ``path`` without following a final symlink and without blocking, and return
    the descriptor of a regular file (created 0600 with ``create``; an existing file
    opened for writing is narrowed to 0600).

    Args:
        path: the file.
        flags: ``os.O_*`` access flags (``O_CREAT``/``O_EXCL`` as needed).
        create: announce the step as ``"create"`` rather than ``"open"``.

    Raises:
        NotRegularFileError: the path is not a regular file (ELOOP for a symlink comes
            from the kernel as a plain OSError).
        OSError: as the system call raises it.
    """
    return open_regular_stat(path, flags, create=create)[0]


def open_regular_stat(path: Any, flags: int, *, create: bool = False) -> tuple[int, os.stat_result]:
    """:func:`open_regular`, and the file's status as it was when opened (the ``fstat``
    that checked it is a regular file: its size, without another system call)."""
    # (The fault hook's announcement of step, written out: every file an open of a bus
    # reads comes here.)
    hook = _hook
    if hook is not None:
        hook("create" if create else "open", str(path))
    fd = os.open(path, flags | _SAFE, FILE_MODE)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, _NOT_REGULAR, str(path))
    if flags & (os.O_WRONLY | os.O_RDWR):
        try:
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, FILE_MODE)
        except OSError:
            os.close(fd)
            raise
    return fd, st


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: it cannot be
    signalled, but it is there)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bus_folder(path: str | Path) -> None:
    """Make sure ``path`` is a folder of the bus (created 0700 when missing), never a
    symlink or a file standing where it belongs.

    Raises:
        NotRegularFileError: something other than a folder is there.
        OSError: as the system calls raise it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            os.mkdir(path, 0o700)
            return
        except FileExistsError:
            st = os.lstat(path)  # made meanwhile
    if not stat.S_ISDIR(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, "not a directory of the bus", str(path))


def read_bus_folder(path: Path) -> os.stat_result | None:
    """The status of the bus folder ``path`` for a reader, without following a link:
    None when it is missing (nothing of that kind to read).

    Raises:
        SerializationError: something other than a folder stands there (a file, a FIFO,
            a symlink): a listing through it would show no files, or another folder's,
            as the bus's.
        OSError: as ``lstat`` raises it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise SerializationError(
            f"{Path(path).name} is not a folder of the bus (a file, a FIFO or a symlink "
            "stands there); a bus's files are never read through links or from special "
            "files: put its folder back", path=path)
    return st


def create_exclusive(path: Any, *, readable: bool = False) -> int:
    """Create a new regular file at ``path`` (0600), refusing anything already there;
    opened for writing (``readable``: for reading too)."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    return open_regular(path, flags, create=True)


def read_fd(fd: int, size: int = -1) -> bytes:
    """All bytes of the open regular file ``fd``, from its start. ``size``: its size
    when known (an ``fstat`` just made), else it is asked for. Each read asks for one
    byte more than the bytes left, so that a short read past ``size`` (the end of the
    file) ends it without one more read that returns nothing; a short read before
    ``size`` (the kernel returns at most about 2 GiB a call) reads on."""
    if size < 0:
        size = os.fstat(fd).st_size
    parts = []
    pos = 0
    while True:
        # (At least a page past the known size: a file that grew since is read on in
        # steps of that, without a 64 KiB buffer for a file of a few hundred bytes.)
        want = max(size - pos, 4096) + 1
        chunk = os.pread(fd, want, pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
        if len(chunk) < want and pos >= size:
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_all(path: Any) -> bytes:
    """All bytes of the regular file ``path`` (opened no-follow, non-blocking).

    Raises:
        OSError: missing, unreadable, or not a regular file.
    """
    fd, st = open_regular_stat(path, os.O_RDONLY)
    try:
        return read_fd(fd, st.st_size)
    finally:
        os.close(fd)


def read_private(path: Any) -> np.ndarray:
    """All bytes of the regular file ``path`` in a new writable uint8 array that nothing
    else refers to: read straight into it (no intermediate ``bytes``), so its memory is
    touched once. A file that grows while it is read is read to its end.

    Raises:
        OSError: missing, unreadable, or not a regular file.
    """
    fd, st = open_regular_stat(path, os.O_RDONLY)
    size = st.st_size
    try:
        buf = np.empty(size, np.uint8)
        pos = 0
        while pos < size:
            got = os.preadv(fd, [buf[pos:].data], pos)
            if not got:
                return buf[:pos]
            pos += got
        more = _read_tail(fd, size)
        if more:
            return np.concatenate((buf, np.frombuffer(more, np.uint8)))
        return buf
    finally:
        os.close(fd)


def _read_tail(fd: int, pos: int) -> bytes:
    """The bytes of ``fd`` from ``pos`` to its end (empty when there are none)."""
    parts: list[bytes] = []
    while True:
        chunk = os.pread(fd, 1 << 16, pos)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        pos += len(chunk)


def write_all(fd: int, data: Any, path: Any) -> int:
    """Write all of ``data`` to ``fd``; returns how many bytes were written."""
    step("write", path)
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return total


def pwrite_all(fd: int, data: Any, pos: int, path: Any) -> int:
    """Write all of ``data`` to ``fd`` at offset ``pos``; returns how many bytes were
    written."""
    step("write", path)
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
    return total


_ZEROS = bytes(1 << 16)


def allocate(fd: int, offset: int, length: int, path: Any) -> None:
    """Write ``length`` zero bytes to ``fd`` at ``offset`` (the file grows to cover
    them): space written ahead, which later writes overwrite. Unlike space reserved with
    ``posix_fallocate`` (unwritten extents, which the file system converts, and commits
    to its journal, as each block is first written), overwriting blocks already written
    changes no metadata, so a later ``fdatasync`` of them commits nothing but data."""
    step("allocate", path)
    end = offset + length
    while offset < end:
        n = min(end - offset, len(_ZEROS) * 16)
        view = memoryview(_ZEROS)
        parts = [view] * (n // len(_ZEROS))
        if n % len(_ZEROS):
            parts.append(view[: n % len(_ZEROS)])
        offset += os.pwritev(fd, parts, offset)


def fsync(fd: int, path: Any) -> None:
    step("fsync", path)
    os.fsync(fd)


def fdatasync(fd: int, path: Any) -> None:
    step("fsync", path)
    os.fdatasync(fd)


def truncate(fd: int, size: int, path: Any) -> None:
    step("truncate", path)
    os.ftruncate(fd, size)


def replace(src: Any, dst: Any) -> None:
    step("rename", dst)
    os.replace(src, dst)


def unlink(path: Any, *, missing_ok: bool = True) -> None:
    step("unlink", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def fsync_dir(directory: Path, *, strict: bool = True) -> None:
    """Make a directory's entries (a created, renamed or deleted file) durable. With
    ``strict=False`` a platform that cannot fsync directories is tolerated."""
    step("fsync_dir", directory)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def replace_small_file(directory: Path, name: str, data: bytes) -> None:
    """Replace ``directory/name`` with ``data`` atomically: a temporary ``.name.tmp``
    (a leftover, or a planted link, is removed first, never written through), created
    0600 and exclusively, written and fsynced, renamed over ``name``, and the directory
    fsynced. On failure the old file, if any, stays and the temporary is removed.

    Raises:
        OSError: the disk refused.
    """
    tmp = directory / f".{name}.tmp"
    unlink(tmp)
    fd = create_exclusive(tmp)
    try:
        write_all(fd, data, tmp)
        fsync(fd, tmp)
    except BaseException:
        os.close(fd)
        unlink(tmp)
        raise
    os.close(fd)
    replace(tmp, directory / name)
    fsync_dir(directory)


class HookedWriter:
    """A buffered file on a descriptor (``write``, ``seek``, ``tell``, ``truncate``,
    ``flush``) whose writes are hooked steps: one before the first write, then one per
    ``step_bytes`` written, and one per flush."""

    def __init__(self, fd: int, path: Any, step_bytes: int = 1 << 20) -> None:
        self.fd = fd
        self.path = path
        self.f = os.fdopen(fd, "wb", buffering=step_bytes, closefd=False)
        self.step_bytes = step_bytes
        self.unannounced = step_bytes
        self.closed = False

    def write(self, b: Any) -> int:
        n = len(memoryview(b).cast("B"))
        if self.unannounced >= self.step_bytes:
            step("write", self.path)
            self.unannounced = 0
        self.unannounced += n
        return self.f.write(b)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self.f.truncate(size)

    def flush(self) -> None:
        step("write", self.path)
        self.f.flush()

    def close(self) -> None:
        """Close the file and its descriptor (without flushing: call flush first)."""
        if not self.closed:
            self.closed = True
            try:
                self.f.close()
            except OSError:
                pass
            os.close(self.fd)
