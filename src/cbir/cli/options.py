"""Options shared by every command that describes images, and their translation to the API.

Defined once as ``Annotated`` aliases so ``extract``, ``bench``, ``index`` and ``train``
spell them identically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from cbir.models.descriptor import RADENOVIC_SCALES, Descriptor, build_descriptor

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
EngineOpt = Annotated[str, typer.Option("--engine", help="Inference engine: torch or onnx.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per model batch.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-j", help="Decode worker processes (default: one per core).")
]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", help="Skip images with more pixels than this.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


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
            raise typer.BadParameter(f"bad scale {part!r}") from exc
        if value <= 0:
            raise typer.BadParameter("scales must be positive")
        out.append(value)
    return out or None


def make_descriptor(
    model: str,
    *,
    weights: Path | None = None,
    pooling: str | None = None,
    scales: str | None = None,
    whiten: Path | None = None,
    image_size: int | None = None,
    resize: str | None = None,
    crop: int | None = None,
    token: str = "patch",
) -> Descriptor:
    """Build the descriptor the options describe, turning API errors into CLI errors."""
    try:
        return build_descriptor(
            model,
            pooling=pooling,
            scales=parse_scales(scales),
            whitening=whiten,
            weights=weights,
            token=token,
            image_size=image_size,
            resize=resize,
            crop=crop,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc


def extract_options(engine: str, batch_size: int, workers: int | None, max_pixels: int, quiet: bool) -> dict[str, Any]:
    return {
        "engine": engine,
        "batch_size": batch_size,
        "workers": workers,
        "max_pixels": max_pixels,
        "progress": not quiet,
    }
