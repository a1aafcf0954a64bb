"""Locks: readers-writer inside a process, an exclusive file lock across processes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cbir import workers

try:  # POSIX only; elsewhere two writing processes are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class ReadWriteLock:
    """Many concurrent readers (searches) or one writer (a commit); writers go first
    once waiting, so a stream of searches cannot starve an update."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:  # a writer may read its own state
                self._writer_depth += 1
                reentrant = True
            else:
                reentrant = False
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                if reentrant:
                    self._writer_depth -= 1
                else:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                self._waiting_writers += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting_writers -= 1
                self._writer = me
                self._writer_depth = 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()


class BusyError(RuntimeError):
    """Another process is writing to the same index folder."""


class FileLock:
    """An advisory ``flock`` on ``folder/lock``, held while this process writes.

    The kernel drops it when the process dies (kill -9 included), so a crash never leaves
    the index locked. Its descriptor is registered with :mod:`cbir.workers`, so forked
    helper processes drop their copy and cannot keep the folder locked after we die.
    Re-entrant within a process (any thread of the holder may nest).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._depth = 0
        self._mutex = threading.RLock()

    @property
    def held(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def hold(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the lock for the block; wait up to ``wait`` seconds for another holder to
        finish (0: fail at once with :class:`BusyError`)."""
        with self._mutex:
            if self._depth == 0 and fcntl is not None:
                self._acquire(wait)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fh is not None:
                    workers.release(self._fh.fileno())
                    fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                    self._fh.close()
                    self._fh = None

    def _acquire(self, wait: float) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - kept open while held
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.02
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    fh.close()
                    waited = f" (waited {wait:g}s)" if wait > 0 else ""
                    raise BusyError(
                        f"another process is writing to the index in {self.path.parent}{waited}; "
                        "wait for it to finish, or use --wait SECONDS"
                    ) from exc
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.5)
        workers.parent_only(fh.fileno())
        self._fh = fh

    def busy(self) -> bool:
        """Whether another process holds the lock now (without taking it for long)."""
        if self.held:
            return False
        try:
            with self.hold():
                return False
        except BusyError:
            return True
        except OSError:  # read-only folder: cannot tell
            return False
