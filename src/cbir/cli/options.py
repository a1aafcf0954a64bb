"""Options shared by every command that describes images, and their translation to the API.

Each option is defined once, as an ``Annotated`` alias. The commands that describe images
(``extract``, ``whiten``, ``bench gpr1200``, ``bench revisited``, ``rmac-whiten``,
``index``) do not list them: :func:`descriptor_options` and :func:`extraction_options`
add them to a command's signature and hand the command one :class:`DescriptorOptions` /
:class:`ExtractionOptions` object, so a new option or a changed help text reaches every
command at once and each command says only what is particular to it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cbir.cli.output import progress_enabled
from cbir.defaults import DEFAULT_BACKBONE, DEFAULT_MAX_PIXELS, RADENOVIC_SCALES
from cbir.errors import UsageError

if TYPE_CHECKING:
    from cbir.models.descriptor import Descriptor

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Backbone (efficientnet-lite0/1/2, timm:<name>) or a descriptor file."),
]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Local weights file for the backbone.")]
PoolingOpt = Annotated[
    str | None,
    typer.Option("--pooling", "-p", help="mac, spoc, gem, gem:p=4, gem:learn, rmac, rmac:levels=3, rgem."),
]
ScalesOpt = Annotated[
    str | None,
    typer.Option("--scales", help="Comma-separated scales, e.g. '1,0.7071,0.5' or 'ms' for 1, 1/sqrt(2), 1/2."),
]
WhitenOpt = Annotated[Path | None, typer.Option("--whiten", help="Whitening file learned with 'cbir whiten'.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Override the input size.")]
ResizeOpt = Annotated[
    str | None, typer.Option("--resize", help="keep (max side), crop (short side + centre crop) or squash.")
]
CropOpt = Annotated[int | None, typer.Option("--crop", help="Centre-crop size for --resize crop.")]
TokenOpt = Annotated[str, typer.Option("--token", help="ViTs: 'patch' (token map) or 'cls' (class token).")]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="Inference engine: torch, onnx or onnx-int8 (default: onnx where ONNX Runtime is installed; "
        "for an existing index, the engine that made its vectors).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU where the engine can use one), cpu or cuda.")]
CalibrateOpt = Annotated[
    Path | None,
    typer.Option("--calibrate", help="onnx-int8: calibration images, in no benchmark (default: ../shared/datasets/"
                 "train-pool where present)."),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per model batch.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-j", help="Decode worker processes (default: one fewer than the cores, 1 to 8; "
                "on 2 cores or fewer 0: decoded in this process while two one-thread model calls run)."),
]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", help="Skip images with more pixels than this.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (there is none when stderr is not a terminal).")
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Skip files and folders matching GLOB (relative path or name, e.g. '*/private/*', '*.png'); repeatable.",
    ),
]
IncludeHiddenOpt = Annotated[
    bool,
    typer.Option("--include-hidden", help="Also walk hidden files and folders (.*), @eaDir and .thumbnails."),
]


def parse_scales(text: str | None) -> list[float] | None:
    """'1,0.7071,1/2' -> [1.0, 0.7071, 0.5]; 'ms' -> Radenovic et al.'s three scales."""
    if text is None:
        return None
    if text.strip().lower() in ("ms", "multi", "radenovic"):
        return list(RADENOVIC_SCALES)
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        num, slash, den = part.partition("/")
        try:
            if den.startswith("sqrt(") and den.endswith(")"):
                value = float(num) / math.sqrt(float(den[5:-1]))
            else:
                value = float(num) / float(den) if slash else float(num)
        except ValueError as exc:
            raise UsageError(f"--scales: bad scale {part!r}") from exc
        if value <= 0:
            raise UsageError("--scales: scales must be positive")
        out.append(value)
    return out or None


# ----------------------------------------------------------------------------------------
# option objects and the decorators that declare them on a command
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DescriptorOptions:
    """What ``--model``, ``--pooling``, ``--scales``, ... say about the descriptor."""

    model: str | None = DEFAULT_BACKBONE
    weights: Path | None = None
    pooling: str | None = None
    scales: str | None = None
    whiten: Path | None = None
    image_size: int | None = None
    resize: str | None = None
    crop: int | None = None
    token: str = "patch"

    def customised(self) -> bool:
        """True when any option other than ``--model`` differs from its default."""
        defaults = DescriptorOptions()
        return any(
            getattr(self, f.name) != getattr(defaults, f.name)
            for f in dataclasses.fields(self)
            if f.name != "model"
        )

    def build(self, **overrides: Any) -> Descriptor:
        """The descriptor (``overrides`` replace options, e.g. a command's own defaults)."""
        from cbir.api import build_descriptor  # torch: only when a command runs

        o = dataclasses.replace(self, **overrides) if overrides else self
        return build_descriptor(
            o.model or DEFAULT_BACKBONE, pooling=o.pooling, scales=parse_scales(o.scales),
            whitening=o.whiten, weights=o.weights, token=o.token, image_size=o.image_size,
            resize=o.resize, crop=o.crop,
        )  # fmt: skip


@dataclass(frozen=True)
class ExtractionOptions:
    """How to run the extraction: engine, batch, decode workers, size limit, progress."""

    engine: str | None = None  # None: the library's default (onnx where installed; an index's own)
    device: str = "auto"
    calibrate: Path | None = None
    batch_size: int = 32
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    quiet: bool = False

    def kwargs(self, *, engine: bool = True) -> dict[str, Any]:
        """Keyword arguments for :func:`cbir.extract.extract` and the functions on top of it."""
        out: dict[str, Any] = {
            "batch_size": self.batch_size,
            "workers": self.workers,
            "max_pixels": self.max_pixels,
            "progress": progress_enabled(self.quiet),
        }
        if engine:
            if self.engine is not None:
                out["engine"] = self.engine
            out.update(self.engine_options())
        return out

    def engine_options(self) -> dict[str, Any]:
        """``device`` and ``calibrate``, for whatever runs the engine."""
        return {"device": self.device, "calibrate": self.calibrate}


_DESCRIPTOR_OPTIONS: dict[str, Any] = {
    "model": ModelOpt,
    "weights": WeightsOpt,
    "pooling": PoolingOpt,
    "scales": ScalesOpt,
    "whiten": WhitenOpt,
    "image_size": ImageSizeOpt,
    "resize": ResizeOpt,
    "crop": CropOpt,
    "token": TokenOpt,
}
_EXTRACTION_OPTIONS: dict[str, Any] = {
    "engine": EngineOpt,
    "device": DeviceOpt,
    "calibrate": CalibrateOpt,
    "batch_size": BatchOpt,
    "workers": WorkersOpt,
    "max_pixels": MaxPixelsOpt,
    "quiet": QuietOpt,
}

F = TypeVar("F", bound=Callable[..., Any])


def _inject(
    target: str, cls: type, annotations: dict[str, Any], omit: tuple[str, ...], defaults: dict[str, Any]
) -> Callable[[F], F]:
    """Replace the command's ``target`` parameter by one CLI option per field of ``cls``;
    the command receives them back as one ``cls`` instance.

    typer reads a command's options from its signature, so the wrapper publishes the
    command's own parameters followed by the shared ones (``__signature__`` and
    evaluated ``__annotations__``, which is what typer and ``inspect`` look at).
    """
    unknown = set(defaults) - set(annotations)
    if unknown:
        raise TypeError(f"no such option: {sorted(unknown)}")
    base = cls()
    shared = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=annotation,
            default=defaults.get(name, getattr(base, name)),
        )
        for name, annotation in annotations.items()
        if name not in omit
    ]
    names = [p.name for p in shared]

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        if target not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {target!r} to receive the options")
        own = [p for p in sig.parameters.values() if p.name != target]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{fn.__name__} declares shared options itself: {sorted(clash)}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names if n in kwargs}
            kwargs[target] = dataclasses.replace(base, **{**defaults, **given})
            return fn(*args, **kwargs)

        params = own + shared
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        if sig.return_annotation is not inspect.Signature.empty:
            wrapper.__annotations__["return"] = sig.return_annotation
        return wrapper  # type: ignore[return-value]

    return decorate


def descriptor_options(
    *, omit: tuple[str, ...] = (), declare: dict[str, Any] | None = None, **defaults: Any
) -> Callable[[F], F]:
    """Give a command the descriptor options, received as ``describe: DescriptorOptions``.

    ``omit`` leaves options out (``whiten`` for commands that learn a whitening);
    ``declare`` replaces an option's declaration (its help text for this command);
    keyword arguments change a default for this command (``pooling="rmac"``).
    """
    annotations = {**_DESCRIPTOR_OPTIONS, **(declare or {})}
    return _inject("describe", DescriptorOptions, annotations, omit, defaults)


def extraction_options(*, omit: tuple[str, ...] = (), **defaults: Any) -> Callable[[F], F]:
    """Give a command the extraction options, received as ``extraction: ExtractionOptions``."""
    return _inject("extraction", ExtractionOptions, _EXTRACTION_OPTIONS, omit, defaults)


def parse_size(text: str | None) -> int | None:
    """Bytes from ``2G``, ``512M``, ``1.5GiB`` or a plain number (None stays None)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise UsageError(f"{text!r}: expected a size such as 2G, 512M or 1073741824") from None
    if value <= 0:
        raise UsageError("the memory budget must be positive")
    return int(value)
