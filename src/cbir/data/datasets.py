"""Where the images of a job come from: folders, GPR1200-style collections, class folders.

Only listing and labelling lives here; decoding is :mod:`cbir.data.decode`.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cbir.data.decode import is_image_path

#: Folders skipped by default besides hidden ones (``.*``): thumbnail caches that NAS boxes
#: and desktops write next to the photos (Synology's ``@eaDir``, the freedesktop cache).
SKIPPED_FOLDERS = frozenset({"@eaDir", ".thumbnails", "#recycle", "@Recycle"})


def is_skipped_name(name: str) -> bool:
    """A hidden file or folder (``.*``) or a known thumbnail folder."""
    return name.startswith(".") or name in SKIPPED_FOLDERS


def _excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    """``rel``: the path relative to the walked root (``/``-separated) matches a pattern, or
    its last part does (``'*.png'``, ``'private'``); a folder also matches ``'*/private/*'``."""
    return any(fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(rel + "/", pat)
               for pat in patterns)  # fmt: skip


def list_images(
    root: str | os.PathLike,
    *,
    recursive: bool = True,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
) -> list[Path]:
    """Image files under ``root`` in a stable (sorted) order.

    Symbolic links are followed only while they point inside ``root``, so an indexed
    folder can never pull in files from elsewhere on the machine. Hidden files and folders
    (``.*``) and thumbnail caches (:data:`SKIPPED_FOLDERS`) are left out unless
    ``include_hidden``: their images are copies that would crowd every result list.
    ``exclude``: glob patterns matched against each path relative to ``root`` and against its
    name (``'*/private/*'``, ``'*.png'``); a matching folder is not entered.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    real_root = root.resolve()
    found: list[Path] = []
    visited: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        if real_here in visited or not _inside(here, real_root):
            # a symlink loop, a second name for a folder already listed, or outside root
            dirnames[:] = []
            continue
        visited.add(real_here)
        rel_here = here.relative_to(root).as_posix()
        prefix = "" if rel_here == "." else rel_here + "/"
        dirnames[:] = [
            d for d in dirnames
            if (include_hidden or not is_skipped_name(d)) and not _excluded(prefix + d, d, exclude)
        ]  # fmt: skip
        # real folders before symlinked ones, so a folder is listed under its own name
        dirnames.sort(key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        for name in sorted(filenames):
            p = here / name
            if not is_image_path(p) or (not include_hidden and name.startswith(".")):
                continue
            if exclude and _excluded(prefix + name, name, exclude):
                continue
            if p.is_symlink() and not _inside(p, real_root):
                continue
            found.append(p)
        if not recursive:
            break
    return sorted(set(found))


def _inside(path: Path, real_root: Path) -> bool:
    try:
        path.resolve().relative_to(real_root)
        return True
    except (ValueError, OSError):
        return False


#: GPR1200's six domains, 200 categories each, in the order of the official evaluation.
GPR1200_DOMAINS: dict[str, tuple[int, int]] = {
    "landmarks": (0, 199),
    "inat": (200, 399),
    "sketch": (400, 599),
    "instre": (600, 799),
    "sop": (800, 999),
    "faces": (1000, 1199),
}


@dataclass
class GPRCollection:
    """A GPR1200-format collection: files ordered by integer category, plus domains."""

    root: Path
    files: list[Path]
    categories: list[int]
    domains: dict[str, tuple[int, int]]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]


def gpr_category(name: str) -> int:
    """The integer before the first ``_`` of a GPR1200 file name."""
    head = Path(name).name.split("_", 1)[0]
    try:
        return int(head)
    except ValueError as exc:
        raise ValueError(f"{name!r} is not a GPR1200 file name (<category>_<name>.jpg)") from exc


def load_gpr_collection(root: str | os.PathLike) -> GPRCollection:
    """Read a GPR1200-format folder (``root`` or ``root/images``) and its ``subsets.json``.

    Files are ordered by (category, name): the official evaluation orders by category
    only and takes the file system's order inside a category, which is not reproducible;
    the name makes it so without changing any per-category score.
    """
    root = Path(root)
    image_dir = root / "images" if (root / "images").is_dir() else root
    files = [p for p in image_dir.iterdir() if p.is_file() and is_image_path(p)]
    if not files:
        raise FileNotFoundError(f"no images in {image_dir}")
    files.sort(key=lambda p: (gpr_category(p.name), p.name))
    categories = [gpr_category(p.name) for p in files]
    subsets = root / "subsets.json"
    if subsets.is_file():
        raw = json.loads(subsets.read_text())
        domains = {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
    else:
        domains = dict(GPR1200_DOMAINS)
    return GPRCollection(root=root, files=files, categories=categories, domains=domains)


@dataclass
class LabelledImages:
    """Images with class labels, e.g. ``DATA/<class>/*.jpg``."""

    files: list[Path]
    labels: list[int]
    classes: list[str]


def load_class_folders(root: str | os.PathLike, *, min_per_class: int = 1) -> LabelledImages:
    """Read ``root/<class>/<image>`` into files and integer labels (classes sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    classes: list[str] = []
    files: list[Path] = []
    labels: list[int] = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        imgs = list_images(cdir)
        if len(imgs) < min_per_class:
            continue
        classes.append(cdir.name)
        files.extend(imgs)
        labels.extend([len(classes) - 1] * len(imgs))
    if not files:
        raise FileNotFoundError(f"no class folders with images in {root}")
    return LabelledImages(files=files, labels=labels, classes=classes)
