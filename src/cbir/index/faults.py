"""Named fault points, for the fault-injection tests (in the spirit of SQLite's test hooks).

The index calls :func:`point` at the places where a crash is most dangerous: between the
journal write and the catalogue commit, half-way through a file write, between writing a
new base file and switching to it, and so on. Normally that is one global lookup. With
the environment variable ``CBIR_FAULT`` set, the named point acts out a fault::

    CBIR_FAULT=commit.before:kill        # SIGKILL this process at that point
    CBIR_FAULT=journal.write:term        # SIGTERM (default action: the process ends)
    CBIR_FAULT=extract.batch:kill@3      # the third time the point is reached
    CBIR_FAULT=compact.base_written:raise  # raise FaultInjected (in-process tests)

Points (see docs/indexing.md, "Fault injection"): ``create.descriptor_saved``,
``extract.batch``, ``commit.before``, ``commit.after``, ``journal.write``, ``base.write``,
``compact.base_written``, ``compact.manifest_written``. Users never set this variable.
"""

from __future__ import annotations

import os
import signal

ENV = "CBIR_FAULT"

POINTS = (
    "create.descriptor_saved",  # index creation: descriptor saved, catalogue not yet in place
    "extract.batch",  # a batch described by the model, not yet committed (workers alive)
    "commit.before",  # journal segment written, catalogue transaction not yet committed
    "commit.after",  # catalogue committed, the next batch not yet started
    "journal.write",  # half of a journal segment written
    "base.write",  # half of a new base file written (under its temporary name)
    "compact.base_written",  # new base file in place, manifest still names the old one
    "compact.manifest_written",  # manifest switched, old base and journal not yet deleted
)


class FaultInjected(RuntimeError):
    """Raised by a point whose action is ``raise``."""


def _parse(spec: str | None) -> tuple[str, str, int] | None:
    if not spec:
        return None
    name, _, action = spec.partition(":")
    action, _, nth = (action or "kill").partition("@")
    if name not in POINTS or action not in ("kill", "term", "raise"):
        raise ValueError(f"{ENV}={spec!r}: expected POINT:kill|term|raise[@N], POINT one of {POINTS}")
    return name, action, int(nth or 1)


_spec = _parse(os.environ.get(ENV))
_hits = 0


def point(name: str) -> None:
    """A named place where a test may inject a fault (no effect unless ``CBIR_FAULT`` names it)."""
    global _hits
    if _spec is None or _spec[0] != name:
        return
    _hits += 1
    if _hits != _spec[2]:
        return
    action = _spec[1]
    if action == "raise":
        raise FaultInjected(f"fault injected at {name}")
    # SIGKILL ends the process here; SIGTERM too unless a handler is installed (then the
    # handler runs at the next bytecode, as it would for a real signal)
    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)


def configure(spec: str | None) -> None:
    """Set (or clear, with None) the fault for this process, as ``CBIR_FAULT`` would."""
    global _spec, _hits
    _spec, _hits = _parse(spec), 0
