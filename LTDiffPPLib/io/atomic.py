"""Atomic output: every file or folder is written under a hidden temporary name, then renamed into place.

A failed write leaves neither a partial output nor a damaged old one; temporaries of writers killed
mid-write are swept by the next write. Problems with an output path raise
:class:`~LTDiffPPLib.errors.OutputError` naming it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from .formats import _image_ext

__all__ = ["atomic_output", "check_output_path"]

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_output_path(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Path:
    """Raise :class:`OutputError` unless ``final_path`` can be written (call it before long work).

    Refuses an existing output without ``overwrite``, replacing a file by a folder or the reverse,
    and a missing or read-only parent folder.
    """
    final = Path(final_path)
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


_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _sweep_stale(final: Path) -> None:
    """Remove ``final``'s temporaries left by writers on this host that were killed mid-write.

    A temporary is ``.{name}.tmp-{host}-{pid}-{random}``; one whose process no longer exists can never
    be completed. Temporaries of live processes and of other hosts (shared file systems) are left alone.
    """
    prefix = f".{final.name}.tmp-{_HOST_TAG}-"
    try:
        siblings = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in siblings:
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted writer (pid %s)", path, pid)
            _remove(path)


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
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: kernel or file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


@contextmanager
def atomic_output(final_path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final_path``; move it into place when the block succeeds.

    The temporary is ``.{name}.tmp-{host}-{pid}-{random}`` (a file's keeps its extension at the end, so
    writers that choose a format by extension still work); with ``is_dir`` it is created as an empty
    folder. An exception in the block removes it and leaves any existing output untouched; a process
    killed mid-write leaves only the hidden temporary, which the next write of the same output removes.
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
        raise OutputError(f"Cannot write {final}: {exc}") from exc
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
        raise OutputError(f"Cannot write {final}: {exc}") from exc
    except BaseException:
        _remove(tmp)
        raise
