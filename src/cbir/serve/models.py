"""Response bodies of the API: they make the OpenAPI schema at /docs precise."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ImageRef(BaseModel):
    """An indexed image as every response names it."""

    id: int
    path: str = Field(description="Relative to the indexed folder; uploads: uploads/<name>.")
    thumbnail: str = Field(description="URL of a JPEG thumbnail.")
    image: str = Field(description="URL of the original file.")


class SearchResult(ImageRef):
    score: float = Field(description="Cosine similarity to the query (1: the same image).")


class SearchResponse(BaseModel):
    query: dict[str, Any]
    k: int
    min_score: float | None
    count: int
    took_ms: float
    results: list[SearchResult]


class CollectionPage(BaseModel):
    total: int = Field(description="Indexed images in the collection.")
    offset: int
    limit: int
    items: list[ImageRef]


class ImageInfo(ImageRef):
    format: str | None
    width: int = Field(description="Upright width in pixels (after EXIF orientation).")
    height: int
    bytes: int = Field(description="File size.")
    modified: float = Field(description="File modification time, Unix seconds.")


class AddResponse(BaseModel):
    id: int
    path: str
    added: bool


class RemoveResponse(BaseModel):
    removed: int


class HealthResponse(BaseModel):
    status: str
    images: int


class StatsResponse(BaseModel):
    images: int
    failures: int
    model: str = Field(description="The backbone network, in plain words (e.g. efficientnet-lite0).")
    descriptor: str | None = Field(description="Full descriptor: backbone/pooling/scales/whitening.")
    identity: str | None
    index: str = Field(description="FAISS index type.")
    dim: int
    roots: int = Field(description="Number of indexed folders (their paths are not disclosed).")
    server: dict[str, Any]
