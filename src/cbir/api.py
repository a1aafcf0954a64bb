"""The public Python API of cbir: one function per thing a user does.

The ``cbir`` command and the HTTP server call these functions, not the packages below them,
so a behaviour (what opening an index means, which files a folder walk skips, whether a
progress bar is drawn) is decided once. Every error a caller can act on is a
:class:`cbir.errors.CbirError`: errors of the standard library that mean "bad input" (a
missing file, an unusable value) are turned into :class:`InputError` / :class:`UsageError`
at this boundary, so neither the CLI nor the server needs its own list of exceptions.

Heavy modules (torch, FAISS, ONNX Runtime) are imported inside the functions: importing
:mod:`cbir` or :mod:`cbir.api` costs nothing until a function runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.defaults import DEFAULT_ALPHA, DEFAULT_DB
from cbir.errors import CbirError, InputError, UsageError

if TYPE_CHECKING:
    from cbir.benchmarks import GPRBenchmark, RevisitedBenchmark
    from cbir.extract import ExtractionResult
    from cbir.index import Hit, Index, SyncReport
    from cbir.models import Descriptor, Whitening
    from cbir.train.trainer import TrainResult

PathLike = str | os.PathLike


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the standard library's "bad input" errors into :class:`CbirError`s (one place)."""
    try:
        yield
    except CbirError:
        raise
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        raise InputError(str(exc)) from exc
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# ---------------------------------------------------------------------------------------
# images and descriptors
# ---------------------------------------------------------------------------------------
def list_images(root: PathLike, *, exclude: Sequence[str] = (), include_hidden: bool = False,
                recursive: bool = True) -> list[Path]:  # fmt: skip
    """Image files under ``root``, sorted; hidden folders (``.*``), ``@eaDir`` and
    ``.thumbnails`` are skipped unless ``include_hidden``; ``exclude``: glob patterns."""
    from cbir.data.datasets import list_images as _list

    with user_errors():
        return _list(root, recursive=recursive, exclude=exclude, include_hidden=include_hidden)


def images_in(inputs: Sequence[PathLike], *, exclude: Sequence[str] = (), include_hidden: bool = False) -> list[Path]:
    """The image files of several inputs (folders are walked, files kept as given).

    Raises :class:`InputError` for an input that does not exist and when nothing is found,
    naming what was looked at: an empty result is never a silent success."""
    paths: list[Path] = []
    for p in inputs:
        if not os.path.exists(p):
            raise InputError(f"no such file or folder: {p}")
        paths.extend(list_images(p, exclude=exclude, include_hidden=include_hidden))
    if not paths:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} (formats: {_formats()})")
    return paths


def _formats() -> str:
    from cbir.data.decode import IMAGE_EXTENSIONS

    return " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def build_descriptor(model: PathLike | None = None, **options: Any) -> Descriptor:
    """A descriptor from a backbone name (``efficientnet-lite0``, ``timm:<name>``) or a
    descriptor file, with pooling, scales, whitening and preprocessing options."""
    from cbir.defaults import DEFAULT_BACKBONE
    from cbir.models.descriptor import build_descriptor as _build

    with user_errors():
        return _build(model or DEFAULT_BACKBONE, **options)


def extract(descriptor: Descriptor, paths: Sequence[PathLike], *, progress: bool = False,
            **options: Any) -> ExtractionResult:  # fmt: skip
    """Describe ``paths``: rows in input order, unreadable files in ``.failures`` with their
    reason. No progress bar unless ``progress=True`` (a library call should not draw)."""
    from cbir.extract import extract as _extract

    with user_errors():
        return _extract(descriptor, paths, progress=progress, **options)


def whitening(data: PathLike, descriptor: Descriptor, *, kind: str = "pca", dim: int | None = None,
              power: float = 1.0, progress: bool = False, **options: Any) -> Whitening:  # fmt: skip
    """Learn PCA (``kind="pca"``) or Radenovic et al.'s supervised whitening
    (``kind="learned"``, class folders) on a set of images that is not the evaluation set."""
    from cbir.benchmarks import learn_whitening

    with user_errors():
        return learn_whitening(data, descriptor, kind=kind, dim=dim, power=power, progress=progress, **options)


def region_whitening(data: PathLike, descriptor: Descriptor, *, dim: int | None = None, power: float = 1.0,
                     max_images: int | None = None, seed: int = 0, progress: bool = False,
                     **options: Any) -> Whitening:  # fmt: skip
    """Learn R-MAC's region-wise PCA-whitening (Gordo et al. 2016) on a set apart from any
    benchmark and attach it to ``descriptor`` (save the descriptor to keep it). Region vectors
    come from PyTorch: the fit needs every region, not the pooled vector of an inference engine."""
    from cbir.benchmarks import learn_region_whitening

    options["engine"] = "torch"
    with user_errors():
        return learn_region_whitening(data, descriptor, dim=dim, power=power, max_images=max_images, seed=seed,
                                      progress=progress, **options)  # fmt: skip


# ---------------------------------------------------------------------------------------
# indexes
# ---------------------------------------------------------------------------------------
def create_index(path: PathLike = DEFAULT_DB, *, model: Any = None, exist_ok: bool = False,
                 **options: Any) -> Index:  # fmt: skip
    """Create an index in ``path`` (a new or empty folder) with ``model``'s descriptor.
    ``exist_ok``: open the index already there instead of failing. Options as
    :meth:`cbir.index.Index.create` (``factory``, ``memory_budget``, ``dba``, ``store``, ...)."""
    from cbir.index import Index

    with user_errors():
        return Index.create(path, model=model, exist_ok=exist_ok, **options)


def open_index(path: PathLike = DEFAULT_DB, *, readonly: bool = False, **options: Any) -> Index:
    """Open the index in ``path``; never creates one (:class:`IndexNotFoundError` instead)."""
    from cbir.index import Index

    options.pop("create", None)
    with user_errors():
        return Index.open(path, readonly=readonly, **options)


def check_folders(dirs: Sequence[PathLike], *, include_hidden: bool = False) -> list[str]:
    """Absolute folder paths, or an :class:`InputError` that says what is wrong with one:
    missing, a file (with the folder to give instead), or holding no image at all (hidden
    folders, which a walk skips, do not count unless ``include_hidden``)."""
    out = []
    for d in dirs:
        if os.path.isfile(d):
            holder = os.path.dirname(os.path.abspath(d))
            raise InputError(f"{d} is a file, not a folder: give the folder that holds it ({holder})")
        if not os.path.isdir(d):
            raise InputError(f"no such folder: {d}")
        if not _has_image(d, include_hidden):
            raise InputError(f"no images in {d} (formats: {_formats()})")
        out.append(os.path.abspath(d))
    return out


def _has_image(folder: PathLike, include_hidden: bool) -> bool:
    """Whether a walk of ``folder`` finds an image file; stops at the first one."""
    from cbir.data.datasets import is_skipped_name
    from cbir.data.decode import is_image_path

    for _, dirnames, files in os.walk(folder):
        if not include_hidden:
            dirnames[:] = [d for d in dirnames if not is_skipped_name(d)]
        if any(is_image_path(name) and (include_hidden or not name.startswith(".")) for name in files):
            return True
    return False


def index_folders(dirs: Sequence[PathLike], db: PathLike = DEFAULT_DB, *, model: Any = None,
                  exclude: Sequence[str] | None = None, include_hidden: bool | None = None,
                  progress: bool = False, compact: bool = False, engine: str | None = None,
                  batch_size: int = 32, workers: int | None = None, max_pixels: int | None = None,
                  **options: Any) -> tuple[SyncReport, dict[str, Any]]:  # fmt: skip
    """Create the index in ``db`` if there is none, then make it mirror ``dirs`` (see
    :meth:`cbir.index.Index.sync`); returns the sync report and the index's statistics.
    Options as :func:`create_index` (``factory``, ``memory_budget``, ``dba``, ``store``, ``wait``)."""
    from cbir.defaults import DEFAULT_MAX_PIXELS
    from cbir.index import Index

    roots = check_folders(dirs, include_hidden=bool(include_hidden))
    engine_kw = {"engine": engine} if engine else {}
    run = {"progress": progress, "batch_size": batch_size, "workers": workers,
           "max_pixels": DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels}  # fmt: skip
    with user_errors():
        with Index.open(db, model=model, create=True, **engine_kw, **options) as idx:
            report = idx.sync(roots, exclude=exclude, include_hidden=include_hidden, **run)
            if compact:
                idx.compact()
            return report, idx.stats()


def search(db: PathLike, query: Any, k: int = 20, *, qe: int = 0, qe_alpha: float = DEFAULT_ALPHA,
           engine: str | None = None, **options: Any) -> list[Hit]:  # fmt: skip
    """The ``k`` indexed images most like ``query`` (an image file, an indexed path, a PIL image,
    bytes or a vector), best first; ``qe``/``qe_alpha``: alpha query expansion."""
    if k < 1:
        raise UsageError("k must be at least 1")
    engine_kw = {"engine": engine} if engine else {}
    with open_index(db, readonly=True, **engine_kw) as idx, user_errors():
        return idx.search(query, k=k, qe=qe, alpha=qe_alpha, **options)


def index_stats(db: PathLike = DEFAULT_DB) -> dict[str, Any]:
    """What an index holds; ``failures`` lists each failed file with its reason."""
    with open_index(db, readonly=True) as idx:
        stats = idx.stats()
        stats["failures"] = [{"path": r.path, "reason": r.error} for r in idx.failures()]
        return stats


def find_duplicates(db: PathLike = DEFAULT_DB, threshold: float | None = None, *, keep: str = "first",
                    verify: bool = False) -> list[Any]:  # fmt: skip
    """Near-duplicate groups of an index with the file to keep in each and the files to remove
    (:mod:`cbir.index.duplicates`, :mod:`cbir.index.removal`; docs/duplicates.md). ``threshold``:
    default the value calibrated for the default model; ``keep``: first, largest or oldest;
    ``verify``: also group neighbours below the threshold whose local features match (OpenCV)."""
    from cbir.index.duplicates import DEFAULT_THRESHOLD, Verification

    with open_index(db, readonly=True) as idx, user_errors():
        return idx.duplicate_plan(DEFAULT_THRESHOLD if threshold is None else threshold, keep,
                                  verify=Verification() if verify else None)  # fmt: skip


# ---------------------------------------------------------------------------------------
# benchmarks and training
# ---------------------------------------------------------------------------------------
def bench_gpr1200(root: PathLike, descriptor: Descriptor | None = None, *, progress: bool = False,
                  **options: Any) -> GPRBenchmark:  # fmt: skip
    """Score ``descriptor`` (default: the default descriptor) with the GPR1200 protocol."""
    from cbir.benchmarks import run_gpr1200

    desc = descriptor if descriptor is not None else build_descriptor()
    with user_errors():
        try:
            return run_gpr1200(root, desc, progress=progress, **options)
        except RuntimeError as exc:  # a benchmark image that does not decode
            raise InputError(str(exc)) from exc


def bench_revisited(root: PathLike, descriptor: Descriptor | None = None, *, qe: int = 0,
                    qe_alpha: float = DEFAULT_ALPHA, dba: int = 0, dba_alpha: float = DEFAULT_ALPHA,
                    diffusion: bool = False, diffusion_k: int | None = None, diffusion_kq: int | None = None,
                    gnd: PathLike | None = None, full_query: bool = False, progress: bool = False,
                    **options: Any) -> RevisitedBenchmark:  # fmt: skip
    """Score ``descriptor`` with the revisited Oxford/Paris protocol, after alpha-DBA,
    alpha-QE or diffusion re-ranking."""
    from cbir.benchmarks import PostProcessing, run_revisited
    from cbir.defaults import DIFFUSION_K, DIFFUSION_KQ

    if min(qe, dba) < 0 or min(qe_alpha, dba_alpha) < 0:
        raise UsageError("--qe, --qe-alpha, --dba and --dba-alpha must not be negative")
    post = PostProcessing(
        qe_k=qe, qe_alpha=qe_alpha, dba_k=dba, dba_alpha=dba_alpha, diffusion=diffusion,
        diffusion_k=diffusion_k or DIFFUSION_K, diffusion_kq=diffusion_kq or DIFFUSION_KQ,
    )  # fmt: skip
    desc = descriptor if descriptor is not None else build_descriptor()
    with user_errors():
        try:
            return run_revisited(root, desc, gnd=gnd, full_query=full_query, post=post, progress=progress, **options)
        except RuntimeError as exc:
            raise InputError(str(exc)) from exc


def fine_tune(data: Sequence[PathLike], out: PathLike | None = None, *, recipe: str | None = None,
              val: PathLike | None = None, holdout: Sequence[PathLike] | None = None, resume: PathLike | None = None,
              checkpoint_dir: PathLike | None = None, progress: bool = False, log: Any = None,
              **config: Any) -> TrainResult:  # fmt: skip
    """Fine-tune a backbone for retrieval (Radenovic et al. 2018) on class folders or a CSV of
    pairs and write the descriptor file ``out``.

    ``config``: :class:`cbir.train.TrainConfig` fields; with ``recipe`` (``cpu``, ``paper``;
    see :mod:`cbir.train.recipes`) the fields left ``None`` come from the recipe. ``val``:
    validation class folders; ``holdout``: class folders of other data added to validation."""
    from cbir.train import TrainConfig, default_checkpoint_dir, load_class_roots, load_train_data, train

    with user_errors():
        if recipe is not None:
            from cbir.train.recipes import resolve_recipe

            settings = {**resolve_recipe(recipe, config), "recipe": recipe}
        else:
            settings = {k: v for k, v in config.items() if v is not None}
        cfg = TrainConfig(**settings)
        train_data = load_train_data(list(data))
        val_data = load_train_data([val]) if val is not None else None
        holdout_data = load_class_roots(list(holdout)) if holdout else None
        ckpt = checkpoint_dir or (default_checkpoint_dir(out) if out is not None else None)
        return train(cfg, train_data, val=val_data, out=out, checkpoint_dir=ckpt, resume=resume,
                     progress=progress, log=log, holdout=holdout_data)  # fmt: skip


__all__ = [
    "bench_gpr1200",
    "bench_revisited",
    "build_descriptor",
    "check_folders",
    "create_index",
    "extract",
    "find_duplicates",
    "fine_tune",
    "images_in",
    "index_folders",
    "index_stats",
    "list_images",
    "open_index",
    "region_whitening",
    "search",
    "user_errors",
    "whitening",
]
