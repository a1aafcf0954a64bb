"""Locks: readers-writer inside a process, an exclusive file lock across processes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

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

    The kernel drops it when the process dies (kill -9 included), so a crash never
    leaves the index locked.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None
        self._depth = 0
        self._mutex = threading.RLock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0 and fcntl is not None:
                fh = open(self.path, "a+")  # noqa: SIM115 - kept open while held
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    fh.close()
                    raise BusyError(
                        f"another process is writing to the index in {self.path.parent}; "
                        "wait for it to finish"
                    ) from exc
                self._fh = fh
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fh is not None:
                    fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                    self._fh.close()
                    self._fh = None
