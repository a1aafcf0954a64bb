"""Which file of a duplicate group to keep, and so which files a user may remove.

The grouping (:mod:`cbir.index.duplicates`) says which images are copies of the group's
first member; this module turns a group into a decision, by one of three rules:

- ``first``: the group's centre, the image every other member was compared against
  (the only rule under which every removed file is known to be within T of the kept one).
- ``largest``: the most pixels (the best-quality copy survives a resize), then the
  largest file, then group order.
- ``oldest``: the earliest modification time recorded when the file was indexed (the
  original rather than a later copy or export), then group order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from cbir.index.errors import CbirIndexError

KEEP_RULES = ("first", "largest", "oldest")


class Member(Protocol):
    """What a group member needs: its catalogue id, path and similarity to the centre."""

    id: int
    path: str
    score: float


@dataclass(frozen=True)
class FileFacts:
    """What the keep rules compare: pixels (0 when unreadable), bytes, mtime in ns."""

    pixels: int
    size: int
    mtime_ns: int


@dataclass
class DuplicateGroup:
    """A group (centre first) and the member kept under a rule; the others are removable."""

    members: list[Member]
    keep: Member
    remove: list[Member] = field(default_factory=list)


def pixel_count(path: str) -> int:
    """Width x height from the image header only (no pixel decode); 0 if unreadable."""
    try:
        with Image.open(path) as img:
            return int(img.width) * int(img.height)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def choose_keep(group: Sequence[Member], rule: str, facts: Callable[[Member], FileFacts]) -> Member:
    """The member to keep under ``rule`` (one of :data:`KEEP_RULES`); ties: group order."""
    if rule not in KEEP_RULES:
        raise CbirIndexError(f"unknown keep rule {rule!r}: one of {', '.join(KEEP_RULES)}")
    if rule == "first":
        return group[0]
    order = range(len(group))
    if rule == "largest":
        best = min(order, key=lambda i: (-facts(group[i]).pixels, -facts(group[i]).size, i))
    else:
        best = min(order, key=lambda i: (facts(group[i]).mtime_ns, i))
    return group[best]


def plan_removal(
    groups: Sequence[Sequence[Member]], rule: str, facts: Mapping[int, FileFacts] | Callable[[Member], FileFacts]
) -> list[DuplicateGroup]:
    """One :class:`DuplicateGroup` per group: the kept member under ``rule`` and the rest.
    ``facts`` maps a member's id to its :class:`FileFacts` (or is a function of the member)."""
    get = facts if callable(facts) else (lambda m: facts[m.id])
    out = []
    for g in groups:
        keep = choose_keep(g, rule, get)
        out.append(DuplicateGroup(list(g), keep, [m for m in g if m is not keep]))
    return out
