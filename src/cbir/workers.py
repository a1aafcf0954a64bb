"""Helper processes that die with their parent and hold none of its locks.

Decode workers are forked: without care they inherit every open file of the parent,
including the descriptor that holds an index folder's ``flock``, and they outlive a parent
killed by SIGTERM or SIGKILL. A stray worker then keeps the folder locked ("another process
is writing") and its memory until someone finds it. :func:`init_worker`, run first in each
worker, asks the kernel to kill the worker when its parent dies (Linux ``prctl``
``PR_SET_PDEATHSIG``) and points the inherited lock descriptors at ``/dev/null``.

Lock holders register their descriptors with :func:`parent_only` while they hold them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_fds: set[int] = set()
_fds_lock = threading.Lock()


def parent_only(fd: int) -> None:
    """Mark ``fd`` as one no child process may keep (a held lock)."""
    with _fds_lock:
        _fds.add(fd)


def release(fd: int) -> None:
    """Forget ``fd`` (about to be closed)."""
    with _fds_lock:
        _fds.discard(fd)


def init_worker(parent_pid: int) -> None:
    """Initializer of a pool worker: die with the parent, drop the parent's locks.

    The descriptors are replaced by ``/dev/null`` rather than closed, so the numbers stay
    valid for any object in the forked memory that might still close them."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    if not _fds:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in list(_fds):
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)
