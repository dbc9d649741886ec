"""Locks between cogtune processes, with flock: a cache is shared by preprocess and training runs
and taken alone by `cogtune cache prune`; an output folder belongs to one training run at a time.

A lock held by a process that died (kill -9, a node failure) is released by the kernel with it,
so a requeued job is never blocked by a stale lock. An exclusive holder writes its host and pid
into the lock file, so that a run refused names the one that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from cogtune.errors import CogtuneError
from cogtune.util import logs

# flock's answers on a file system that has no locks (Lustre or NFS mounted without them, FUSE).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
NO_LOCK_VARIABLE = "COGTUNE_NO_CACHE_LOCK"


def holder(path: Path) -> str:
    """Who holds an exclusive lock, as its holder wrote it ("" when unknown)."""
    try:
        return path.read_text(errors="replace").strip()[:200]
    except OSError:
        return ""


@contextlib.contextmanager
def flock(path: Path, exclusive: bool, busy: str, what: str):
    """Hold an flock on path (created if need be) for the with-block. busy(holder_text) is the
    message when another process holds it. On a file system without locks: a CogtuneError naming
    the way out, or a warning and no lock when NO_LOCK_VARIABLE=1. A lock file that cannot be
    written (a read-only cache of another user) is locked through a read-only handle; where it does
    not exist and cannot be made, the run goes on without it, and says so."""
    try:
        handle = open(path, "a+")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        try:
            handle = open(path, "r")
        except OSError:
            logs.message(f"warning: cannot create the lock file {path} ({e.strerror}); going on without it.")
            yield
            return
    with handle:
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CogtuneError(busy(holder(path))) from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            if os.environ.get(NO_LOCK_VARIABLE) != "1":
                raise CogtuneError(
                    f"{path.parent} is on a file system without file locks (flock: {e.strerror}), as Lustre or NFS "
                    f"mounted without them are. cogtune locks {what}. Put it on a file system with locks (ask for a "
                    f"mount with -o flock), or set {NO_LOCK_VARIABLE}=1 to go on without locks, and then make sure "
                    "yourself that no two runs use it at once."
                ) from None
            logs.message(f"warning: {path.parent} has no file locks; going on without one ({NO_LOCK_VARIABLE}=1).")
            yield
            return
        if exclusive and handle.mode == "a+":  # name ourselves for whoever is refused
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
                handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
