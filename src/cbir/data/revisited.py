"""Datasets in the revisitop format (revisited Oxford5k / Paris6k, Radenovic et al. 2018).

A dataset is a folder with ``jpg/<name>.jpg`` images and a ground-truth pickle
(``gnd_<dataset>.pkl``) holding ``imlist`` (database names), ``qimlist`` (query names)
and ``gnd[i]`` for query ``i``: ``bbx`` (query crop box, pixels of the query image) and
``easy``/``hard``/``junk`` (indices into ``imlist``), or ``ok``/``junk`` for the original
Oxford/Paris protocol.

The ground truth is a pickle, and unpickling runs code chosen by whoever wrote the file.
:func:`load_gnd` therefore uses a restricted unpickler that can only rebuild builtins
containers and NumPy arrays; any other class in the file is refused with a clear error.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import CbirError

#: (module, name) globals a gnd pickle may reference: NumPy array / scalar reconstruction
#: (both the NumPy 1 and 2 module paths) and plain builtin containers. Nothing that can
#: call arbitrary code (no ``builtins.eval``, no ``copyreg`` reconstructors of other classes).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles store an array's raw bytes
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("builtins", "slice"),
        ("builtins", "range"),
    }
)

#: Ground-truth keys of the revisited protocol, and of the original one.
REVISITED_KEYS = ("easy", "hard", "junk")
ORIGINAL_KEYS = ("ok", "junk")


class GroundTruthError(CbirError, ValueError):
    """The ground-truth file is unreadable, unsafe, or not in the revisitop format."""

    exit_code = 4  # docs/cli.md, "Exit codes"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise GroundTruthError(
            f"refusing to load {module}.{name} from a ground-truth pickle: only builtins and "
            "NumPy arrays are allowed"
        )


def safe_unpickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only builtins containers and NumPy arrays.

    Python-2 era pickles (as the original revisitop files may be) are read with
    ``encoding="latin1"``, which is what NumPy needs to rebuild their arrays.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except GroundTruthError:
        raise
    except Exception as exc:  # truncated file, unknown opcode, ...
        raise GroundTruthError(f"not a readable pickle: {type(exc).__name__}: {exc}") from exc


@dataclass
class QueryGroundTruth:
    """One query's ground truth, indices into the database list (int64 arrays)."""

    bbx: tuple[float, float, float, float] | None
    easy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ok: np.ndarray | None = None  # original protocol only

    def as_dict(self) -> dict[str, np.ndarray]:
        """The index lists as the protocol functions take them."""
        out = {"junk": self.junk}
        if self.ok is not None:
            out["ok"] = self.ok
        else:
            out["easy"], out["hard"] = self.easy, self.hard
        return out


@dataclass
class RevisitedDataset:
    """A revisitop-format dataset: image paths, query boxes and ground truth."""

    root: Path
    gnd_path: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[QueryGroundTruth]
    protocol: str  # "revisited" (easy/hard/junk) or "original" (ok/junk)
    image_dir: Path

    @property
    def name(self) -> str:
        stem = self.gnd_path.stem
        return stem[4:] if stem.startswith("gnd_") else stem

    def image_path(self, name: str) -> Path:
        """revisitop's naming: ``<image_dir>/<name>.jpg`` (a name with a suffix is kept)."""
        return self.image_dir / (name if Path(name).suffix else name + ".jpg")

    @property
    def database_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    @property
    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float] | None]:
        return [g.bbx for g in self.gnd]

    def gnd_dicts(self) -> list[dict[str, np.ndarray]]:
        return [g.as_dict() for g in self.gnd]


def find_gnd(root: str | os.PathLike) -> Path:
    """A dataset folder's ground truth: ``gnd_<folder>.pkl``, else its only ``gnd_*.pkl``."""
    root = Path(root)
    exact = root / f"gnd_{root.name}.pkl"
    if exact.is_file():
        return exact
    found = sorted(root.glob("gnd_*.pkl"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no gnd_*.pkl ground truth in {root}; pass it with --gnd")
    names = ", ".join(p.name for p in found)
    raise FileNotFoundError(f"several ground-truth files in {root} ({names}); pass one with --gnd")


def _index_array(value: Any, n_db: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise GroundTruthError(f"{what} is not a list of integers") from exc
    if arr.size and (arr.min() < 0 or arr.max() >= n_db):
        raise GroundTruthError(f"{what} has indices outside the database (0..{n_db - 1})")
    return arr


def _parse_bbx(value: Any, what: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        box = [float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as exc:
        raise GroundTruthError(f"{what} is not four numbers") from exc
    if len(box) != 4:
        raise GroundTruthError(f"{what} has {len(box)} numbers, expected x1, y1, x2, y2")
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise GroundTruthError(f"{what} = {box} is empty (need x1 < x2 and y1 < y2)")
    return (x1, y1, x2, y2)


def parse_gnd(
    obj: Any, source: str = "ground truth"
) -> tuple[list[str], list[str], list[QueryGroundTruth], str]:
    """Validate an unpickled gnd object: (imlist, qimlist, per-query ground truth, protocol)."""
    if not isinstance(obj, dict):
        raise GroundTruthError(
            f"{source}: expected a dict with imlist, qimlist and gnd, got {type(obj).__name__}"
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
    if missing:
        raise GroundTruthError(f"{source}: missing key(s) {', '.join(missing)}")
    imlist = [str(n) for n in obj["imlist"]]
    qimlist = [str(n) for n in obj["qimlist"]]
    raw = list(obj["gnd"])
    if len(raw) != len(qimlist):
        raise GroundTruthError(
            f"{source}: {len(qimlist)} queries but {len(raw)} ground-truth entries"
        )
    protocols = set()
    gnd: list[QueryGroundTruth] = []
    for i, g in enumerate(raw):
        if not isinstance(g, dict):
            raise GroundTruthError(f"{source}: gnd[{i}] is not a dict")
        where = f"{source}: gnd[{i}]"
        bbx = _parse_bbx(g.get("bbx"), f"{where}['bbx']")
        junk = _index_array(g.get("junk"), len(imlist), f"{where}['junk']")
        if "ok" in g:
            protocols.add("original")
            gnd.append(
                QueryGroundTruth(
                    bbx, junk=junk, ok=_index_array(g["ok"], len(imlist), f"{where}['ok']")
                )
            )
        elif "easy" in g or "hard" in g:
            protocols.add("revisited")
            gnd.append(
                QueryGroundTruth(
                    bbx,
                    easy=_index_array(g.get("easy"), len(imlist), f"{where}['easy']"),
                    hard=_index_array(g.get("hard"), len(imlist), f"{where}['hard']"),
                    junk=junk,
                )
            )
        else:
            raise GroundTruthError(f"{where} has neither easy/hard nor ok positives")
    if len(protocols) > 1:
        raise GroundTruthError(
            f"{source}: mixes the original (ok) and revisited (easy/hard) formats"
        )
    return imlist, qimlist, gnd, protocols.pop() if protocols else "revisited"


def load_gnd(path: str | os.PathLike) -> tuple[list[str], list[str], list[QueryGroundTruth], str]:
    """Read and validate a revisitop ground-truth pickle with the restricted unpickler."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read ground truth {path}: {exc.strerror or exc}") from exc
    try:
        obj = safe_unpickle(data)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{path}: {exc}") from exc
    return parse_gnd(obj, str(path))


def load_revisited(
    root: str | os.PathLike, gnd: str | os.PathLike | None = None, *, check_files: bool = True
) -> RevisitedDataset:
    """Open a revisitop-format folder (images in ``root/jpg`` or directly in ``root``).

    With ``check_files`` every listed image must exist: a benchmark with missing images
    is a different benchmark, so that is an error naming the first missing files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    gnd_path = Path(gnd) if gnd is not None else find_gnd(root)
    imlist, qimlist, entries, protocol = load_gnd(gnd_path)
    image_dir = root / "jpg" if (root / "jpg").is_dir() else root
    ds = RevisitedDataset(root, gnd_path, imlist, qimlist, entries, protocol, image_dir)
    if check_files:
        missing = [str(p) for p in ds.database_paths + ds.query_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in {gnd_path.name} are missing, "
                f"e.g. {', '.join(missing[:3])}"
            )
    return ds


__all__ = [
    "ORIGINAL_KEYS",
    "REVISITED_KEYS",
    "GroundTruthError",
    "QueryGroundTruth",
    "RevisitedDataset",
    "find_gnd",
    "load_gnd",
    "load_revisited",
    "parse_gnd",
    "safe_unpickle",
]
