"""``GET /health`` and ``GET /stats``: liveness, the collection in numbers, the limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cbir.serve.models import HealthResponse, StatsResponse
from cbir.serve.state import ServerState, State

router = APIRouter(tags=["admin"])

#: Keys of ``Index.stats()`` that clients may see (others hold absolute paths).
_PUBLIC_STATS = ("images", "failures", "descriptor", "identity", "index", "dim")


@router.get("/health", response_model=HealthResponse, summary="Liveness and collection size")
async def health(state: State) -> dict[str, Any]:
    stats = await state.lookup(state.index.stats)
    return {"status": "ok", "images": int(stats.get("images", 0))}


@router.get(
    "/stats",
    response_model=StatsResponse,
    summary="Collection size, model, descriptor, index type and the server's limits",
)
async def stats(state: State) -> dict[str, Any]:
    raw = await state.lookup(state.index.stats)
    public: dict[str, Any] = {k: raw[k] for k in _PUBLIC_STATS if k in raw}
    public["model"] = model_name(state)
    public["roots"] = len(raw.get("roots", ()))
    public["server"] = _limits(state)
    return public


def model_name(state: ServerState) -> str:
    """The backbone's name as people know it (``timm:resnet50`` -> ``resnet50``)."""
    name = state.index.descriptor.backbone.spec.name
    return name.split(":", 1)[-1]


def _limits(state: ServerState) -> dict[str, Any]:
    s = state.settings
    return {
        "writes": s.writes,
        "max_upload_bytes": s.max_upload_bytes,
        "max_pixels": s.max_pixels,
        "max_decode_bytes": s.max_decode_bytes,
        "max_k": s.max_k,
        "max_qe": s.max_qe,
        "search_threads": s.search_threads,
        "thumbnails": state.thumbnails.stats(),
    }
