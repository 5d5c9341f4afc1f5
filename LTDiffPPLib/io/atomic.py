"""Atomic output: every file or folder is written under a hidden temporary name, then renamed into place.

A failed write leaves neither a partial output nor a damaged old one; temporaries of writers killed
mid-write are swept by the next write. Problems with an output path raise
:class:`~LTDiffPPLib.errors.OutputError` naming it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from .formats import _image_ext

__all__ = ["atomic_output", "check_not_input", "check_output_path", "output_lock", "write_failure"]

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise :class:`OutputError` when writing ``output`` could touch one of ``inputs``, whatever the flags.

    Refused: an output that resolves to an input (the same path after ``..``, symbolic links and hard
    links), an output inside an input folder (a DICOM series), and an output folder that holds an input
    (replacing the folder would delete it). Inputs are never modified.
    """
    out = Path(os.path.realpath(output))
    for given in inputs:
        if given is None or str(given) == "":
            continue
        src = Path(os.path.realpath(given))
        same = out == src
        if not same and out.exists() and src.exists():
            try:
                same = os.path.samefile(out, src)
            except OSError:
                pass
        if same:
            raise OutputError(f"Cannot write {output}: it is the input {given}; inputs are never modified, "
                              "choose another output path.")
        if src.is_dir() and src in out.parents:
            raise OutputError(f"Cannot write {output}: it lies inside the input folder {given}; inputs are never "
                              "modified, choose an output outside it.")
        if out in src.parents:
            raise OutputError(f"Cannot write {output}: it holds the input {given}, which writing it would "
                              "replace; choose another output path.")


def check_output_path(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Raise :class:`OutputError` unless ``final_path`` can be written (call it before long work).

    Refuses an output that is, holds or lies inside one of ``inputs`` (:func:`check_not_input`), an
    existing output without ``overwrite``, replacing a file by a folder or the reverse, and a missing or
    read-only parent folder.
    """
    final = Path(final_path)
    check_not_input(final, inputs)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputError(f"{final} already exists; pass overwrite=True (--overwrite) or choose another path.")
        if final.is_dir() != is_dir:
            raise OutputError(f"{final} exists and is {'not ' if is_dir else ''}a folder; refusing to replace it.")
    if not final.parent.is_dir():
        raise OutputError(f"Cannot write {final}: folder {final.parent} does not exist.")
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write {final}: folder {final.parent} is not writable.")
    return final


def write_failure(final: str | os.PathLike, exc: BaseException | str) -> OutputError:
    """An :class:`OutputError` for a failed write of ``final``, one line: "no space left on device" when
    the disk is full (errno ENOSPC, or a library's vaguer message while the file system has no room)."""
    text = exc if isinstance(exc, str) else (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    lines = str(text).strip().splitlines()  # libraries append tracebacks (pydicom) or ITK's object dumps
    reason = " ".join(lines[0].split()) if lines else type(exc).__name__
    folder = next((p for p in Path(final).parents if p.is_dir()), Path(final).parent)
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "[Errno 28]" in str(text)
    if not full:
        try:
            full = shutil.disk_usage(folder).free < _FULL_BYTES
        except OSError:
            pass
    if full:
        return OutputError(f"Cannot write {final}: no space left on device (the file system of {folder} is full); "
                           "free some space or choose another output folder.")
    return OutputError(f"Cannot write {final}: {reason}")


#: free bytes below which a failed write is put down to a full disk
_FULL_BYTES = 1 << 20


_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


#: a temporary of :func:`atomic_output` (or a detached header's staging folder): name, host, pid
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}")


def _sweep_stale(final: Path) -> None:
    """Remove the temporaries in ``final``'s folder that writers on this host left when killed mid-write.

    A temporary is ``.{name}.tmp-{host}-{pid}-{random}`` (any output name); one whose process no longer
    exists can never be completed. Temporaries of live processes and of other hosts (shared file
    systems) are left alone, and so are lock files held by a live run (:func:`output_lock`).
    """
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for path in entries:
        m = _TEMPORARY.match(path.name)
        if m and m["host"] == _HOST_TAG and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            log.info("removing %s, left by an interrupted writer (pid %s)", path, m["pid"])
            _remove(path)
        elif path.name.startswith(".") and path.name.endswith(_LOCK_SUFFIX) and path.name != _lock_name(final):
            _remove_if_unlocked(path)


_LOCK_SUFFIX = ".ltdiffpp-lock"


def _lock_name(final: Path) -> str:
    return f".{final.name}{_LOCK_SUFFIX}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding an exclusive lock, or None when another process holds it.

    The lock is taken on the file the path names after locking (a lock file removed and re-created by
    another run in between is locked again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed by its holder meanwhile: lock the new one


def _remove_if_unlocked(path: Path) -> None:
    """Remove a lock file no live run holds (its run was killed)."""
    try:
        fd = _try_lock(path)
    except OSError:
        return
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def output_lock(final_path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on writing ``final_path`` for the duration of the block (one run at a time).

    Take it before the work, so that a second run on the same output is refused up front with
    :class:`OutputError` instead of after its computation. The lock is ``.{name}.ltdiffpp-lock`` beside
    the output (an advisory ``flock``: released by the kernel when a run dies, even by SIGKILL; the
    file is removed on exit, or by the next write in that folder when its run was killed).
    """
    final = Path(final_path)
    lock = final.parent / _lock_name(final)
    try:
        fd = _try_lock(lock)
    except OSError as exc:
        raise OutputError(f"Cannot write {final}: cannot create its lock file {lock} ({exc.strerror or exc}).") from exc
    if fd is None:
        raise OutputError(f"Cannot write {final}: another run is writing it now; wait for that run to finish or "
                          "choose another output path.")
    try:
        yield final
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_output(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final_path``; move it into place when the block succeeds.

    The temporary is ``.{name}.tmp-{host}-{pid}-{random}`` (a file's keeps its extension at the end, so
    writers that choose a format by extension still work); with ``is_dir`` it is created as an empty
    folder. An exception in the block removes it and leaves any existing output untouched; a process
    killed mid-write leaves only the hidden temporary, which the next write into that folder removes.
    An existing output without ``overwrite``, or a missing or read-only parent folder, raise
    :class:`OutputError` up front. An existing folder is replaced by an atomic exchange (Linux), else
    by renaming it aside, moving the new one in, then deleting the old.
    """
    final = check_output_path(final_path, overwrite=overwrite, is_dir=is_dir)
    parent = final.parent
    _sweep_stale(final)
    token = f"{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{final.name}.tmp-{token}{'' if is_dir else (_image_ext(final) or final.suffix)}"
    try:
        if is_dir:
            tmp.mkdir()
    except OSError as exc:
        raise write_failure(final, exc) from exc
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        if not overwrite and (final.exists() or final.is_symlink()):
            raise OutputError(f"{final} appeared while it was being written; not replacing it.")
        if is_dir and final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        elif is_dir and final.exists():
            aside = parent / f".{final.name}.old-{token}"
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise write_failure(final, exc) from exc
    except BaseException:
        _remove(tmp)
        raise
