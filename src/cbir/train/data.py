"""Training data for metric learning: labelled images, matching pairs, splits, decoded-image cache.

Two layouts are accepted:

- class folders ``DATA/<class>/*.jpg`` (several roots may be given; classes are kept
  apart per root): any two images of a class are a matching pair;
- a CSV of ``query,positive,cluster`` rows (paths relative to the CSV's folder, an
  optional header): the pairs are given, and the cluster id says which images must not
  be used as each other's negatives (Radenovic et al. 2018 mine negatives only from
  other 3D models, i.e. other clusters).

Either way the result is a :class:`TrainData`: a file list, one cluster label per file
and the allowed (query, positive) pairs, so the miner and the trainer never care where
the data came from.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.data.datasets import load_class_folders
from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, load_pixels
from cbir.data.transforms import Preprocess
from cbir.errors import CbirError


class TrainDataError(CbirError, ValueError):
    """Training data that cannot be used (missing files, no pairs, bad CSV)."""

    exit_code = 4  # docs/cli.md, "Exit codes"


@dataclass
class TrainData:
    """Images with cluster labels and the (query, positive) pairs that may be trained on.

    ``pairs`` is ``None`` for class-folder data: every image of a class with at least
    two images may be a query, and its positive is drawn from the same class.
    """

    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    pairs: np.ndarray | None = None  # M x 2 indices into files
    source: str = ""
    #: domain of each class (the root folder it came from when several roots are given);
    #: ``None`` = one domain. Validation holds out classes of every domain and scores each.
    class_domains: list[str] | None = None
    _members: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.files) != len(self.labels):
            raise TrainDataError(f"{len(self.files)} files but {len(self.labels)} labels")
        if self.pairs is not None:
            self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        if self.class_domains is not None and len(self.class_domains) != len(self.classes):
            raise TrainDataError(f"{len(self.class_domains)} class domains for {len(self.classes)} classes")
        order = np.argsort(self.labels, kind="stable")
        uniq, starts = np.unique(self.labels[order], return_index=True)
        ends = list(starts[1:]) + [len(order)]
        self._members = {int(u): order[s:e] for u, s, e in zip(uniq, starts, ends, strict=True)}

    def __len__(self) -> int:
        return len(self.files)

    def members(self, label: int) -> np.ndarray:
        """Indices of the images of one cluster."""
        return self._members.get(int(label), np.zeros(0, np.int64))

    def domains(self) -> dict[str, np.ndarray]:
        """Domain name -> the labels (class indices) present in this data, in label order."""
        present = np.unique(self.labels)
        if self.class_domains is None:
            return {"": present}
        out: dict[str, list[int]] = {}
        for lab in present:
            out.setdefault(self.class_domains[int(lab)], []).append(int(lab))
        return {d: np.array(labs, dtype=np.int64) for d, labs in out.items()}

    def query_candidates(self) -> np.ndarray:
        """Indices that can serve as a query: those with at least one positive."""
        if self.pairs is not None:
            return np.unique(self.pairs[:, 0])
        sizes = np.array([len(self.members(lab)) for lab in self.labels])
        return np.flatnonzero(sizes >= 2)

    def sample_positive(self, query: int, rng: np.random.Generator) -> int:
        """A positive for ``query``: one of its CSV partners, or another image of its class."""
        if self.pairs is not None:
            partners = self.pairs[self.pairs[:, 0] == query, 1]
        else:
            partners = self.members(self.labels[query])
            partners = partners[partners != query]
        if partners.size == 0:
            raise TrainDataError(f"{self.files[query]} has no positive")
        return int(partners[rng.integers(len(partners))])

    def subset(self, indices: Sequence[int] | np.ndarray) -> TrainData:
        """The images at ``indices`` (pairs restricted to those with both ends kept)."""
        idx = np.asarray(indices, dtype=np.int64)
        remap = -np.ones(len(self.files), dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        pairs = None
        if self.pairs is not None:
            mapped = remap[self.pairs]
            pairs = mapped[(mapped >= 0).all(axis=1)]
        return TrainData(
            files=[self.files[i] for i in idx],
            labels=self.labels[idx],
            classes=self.classes,
            pairs=pairs,
            source=self.source,
            class_domains=self.class_domains,
        )


def load_class_roots(roots: Sequence[str | os.PathLike]) -> TrainData:
    """Class folders from one or more roots; a class is (root, folder name)."""
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    domains: list[str] = []
    for root in roots:
        data = load_class_folders(root)
        offset = len(classes)
        prefix = Path(root).name
        classes.extend(f"{prefix}/{c}" if len(roots) > 1 else c for c in data.classes)
        domains.extend([prefix] * len(data.classes))
        files.extend(data.files)
        labels.extend(offset + lab for lab in data.labels)
    return TrainData(
        files=files,
        labels=np.array(labels),
        classes=classes,
        source=",".join(map(os.fspath, roots)),
        class_domains=domains if len(roots) > 1 else None,
    )


def load_pairs_csv(path: str | os.PathLike) -> TrainData:
    """Read ``query,positive,cluster`` rows; paths are relative to the CSV's folder.

    A first row whose third field is not an integer is taken as a header. An image that
    appears in two clusters is an error: it would be both a positive and a negative.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainDataError(f"no such CSV file: {path}")
    base = path.parent
    index: dict[Path, int] = {}
    labels: list[int] = []
    pairs: list[tuple[int, int]] = []
    with path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 3:
                raise TrainDataError(f"{path}:{lineno}: expected query,positive,cluster; got {row!r}")
            q, p, cluster = (c.strip() for c in row[:3])
            try:
                cid = int(cluster)
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise TrainDataError(f"{path}:{lineno}: cluster id {cluster!r} is not an integer") from None
            ids = []
            for name in (q, p):
                f = (base / name) if not Path(name).is_absolute() else Path(name)
                if not f.is_file():
                    raise TrainDataError(f"{path}:{lineno}: image not found: {f}")
                if f not in index:
                    index[f] = len(labels)
                    labels.append(cid)
                elif labels[index[f]] != cid:
                    raise TrainDataError(f"{path}:{lineno}: {f} is in clusters {labels[index[f]]} and {cid}")
                ids.append(index[f])
            if ids[0] == ids[1]:
                raise TrainDataError(f"{path}:{lineno}: query and positive are the same image")
            pairs.append((ids[0], ids[1]))
    if not pairs:
        raise TrainDataError(f"{path}: no pairs")
    files = sorted(index, key=index.__getitem__)
    uniq = sorted(set(labels))
    return TrainData(
        files=files,
        labels=np.array(labels),
        classes=[str(u) for u in uniq],
        pairs=np.array(pairs),
        source=os.fspath(path),
    )


def load_train_data(sources: Sequence[str | os.PathLike]) -> TrainData:
    """Class-folder roots, or exactly one ``.csv`` file of pairs."""
    if not sources:
        raise TrainDataError("no training data given")
    csvs = [s for s in sources if Path(s).suffix.lower() == ".csv"]
    if csvs:
        if len(sources) != 1:
            raise TrainDataError("give either one CSV of pairs or class folders, not both")
        return load_pairs_csv(csvs[0])
    try:
        return load_class_roots(sources)
    except FileNotFoundError as exc:
        raise TrainDataError(str(exc)) from exc


def split_by_class(
    data: TrainData, fraction: float, seed: int, *, stratify: bool = True
) -> tuple[TrainData, TrainData]:
    """Hold out whole classes (not images) for validation.

    The validation score then measures retrieval of *unseen* classes, which is what a
    general-purpose descriptor is for and what GPR1200-style benchmarks test. With
    ``stratify`` and several domains (class-folder roots), ``fraction`` of *each* domain's
    classes is held out, so a small domain is not left out of validation by chance (one
    domain's 4 classes among 9 drawn from all would often be 1 or 0); a domain of fewer
    than 4 usable classes is all trained on. With one domain, or ``stratify=False``, the
    classes are drawn from all at once (the behaviour of runs made before stratification).
    """
    if not 0 < fraction < 1:
        raise TrainDataError("validation fraction must be between 0 and 1")
    too_few = "too few classes to hold some out for validation: give --val DIR"
    groups = list(data.domains().values()) if stratify else []
    pooled = len(groups) <= 1
    if pooled:
        groups = [np.unique(data.labels)]
    rng = np.random.default_rng(seed)
    val_labels: list[int] = []
    for labs in groups:
        usable = np.array([u for u in labs if len(data.members(u)) >= 2], dtype=np.int64)
        if len(usable) < 4:
            if pooled:
                raise TrainDataError(too_few)
            continue
        n_val = max(2 if pooled else 1, min(int(round(fraction * len(labs))), len(usable) - 2))
        val_labels.extend(rng.choice(usable, size=n_val, replace=False).tolist())
    if len(val_labels) < 2:
        raise TrainDataError(too_few)
    is_val = np.isin(data.labels, val_labels)
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


def with_holdout(val: TrainData | None, holdout: TrainData) -> TrainData:
    """Validation data with ``holdout`` (data never trained on) added as domains of its own.

    The validation score is the mean over domains, so a domain the training data does not
    cover weighs as much as one it does: fine-tuning that forgets it scores lower.
    """
    h_domains = holdout.class_domains or [Path(holdout.source).name or "holdout"] * len(holdout.classes)
    h_domains = [f"holdout:{d}" for d in h_domains]
    if val is None:
        return TrainData(
            files=list(holdout.files), labels=holdout.labels.copy(), classes=list(holdout.classes),
            source=holdout.source, class_domains=h_domains,
        )  # fmt: skip
    v_labels, v_classes, v_domains = val.labels, list(val.classes), val.class_domains
    if len(v_labels) and v_labels.max() >= len(v_classes):  # a CSV's cluster ids need not be 0..n-1
        uniq, v_labels = np.unique(val.labels, return_inverse=True)
        v_classes, v_domains = [str(u) for u in uniq], None
    v_domains = v_domains or ["train"] * len(v_classes)
    offset = len(v_classes)
    return TrainData(
        files=[*val.files, *holdout.files],
        labels=np.concatenate([v_labels, holdout.labels + offset]),
        classes=[*v_classes, *(f"holdout:{c}" for c in holdout.classes)],
        source=f"{val.source}+holdout:{holdout.source}",
        class_domains=[*v_domains, *h_domains],
    )


class ImageCache:
    """Decoded, resized uint8 images kept in memory, keyed by (file, preprocessing).

    Fine-tuning visits the same images every epoch (queries, positives, the mining pool,
    the validation set); decoding a JPEG costs about as much as a forward pass of a
    small CNN on a CPU, so it is done once.
    """

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_PIXELS, enabled: bool = True) -> None:
        self.max_pixels = max_pixels
        self.enabled = enabled
        self._store: dict[tuple[str, Preprocess], np.ndarray] = {}

    def get(self, path: str | os.PathLike, preprocess: Preprocess) -> np.ndarray:
        key = (os.fspath(path), preprocess)
        arr = self._store.get(key)
        if arr is None:
            try:
                img = load_pixels(path, max_pixels=self.max_pixels, target_size=preprocess.resized_size)
            except DecodeError as exc:
                raise TrainDataError(f"cannot use training image: {exc}") from exc
            arr = preprocess.to_array(img)
            if self.enabled:
                self._store[key] = arr
        return arr
