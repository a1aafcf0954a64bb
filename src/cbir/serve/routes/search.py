"""``POST /search``: the images most similar to an uploaded image or an indexed one."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from cbir.index import Hit, QueryError
from cbir.serve.errors import ApiError
from cbir.serve.models import SearchResponse
from cbir.serve.state import MAX_ID, ServerState, State
from cbir.serve.uploads import check_upload

router = APIRouter(tags=["search"])


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Find the images most similar to a query",
    description="Give either `image` (an uploaded file) or `id` (an indexed image). "
    "`qe` > 0 turns on alpha-query-expansion (Radenovic et al. 2018) with that many "
    "neighbours; `min_score` drops results less similar than that.",
)
async def search(
    request: Request,
    state: State,
    image: Annotated[
        UploadFile | None, File(description="Query image (JPEG, PNG, GIF, BMP, WebP, TIFF, PPM).")
    ] = None,
    id: Annotated[
        int | None, Form(ge=1, le=MAX_ID, description="Id of an indexed image to use as the query.")
    ] = None,
    k: Annotated[int, Form(ge=1, description="Number of results.")] = 20,
    qe: Annotated[int, Form(ge=0, description="Query-expansion neighbours (0: off).")] = 0,
    alpha: Annotated[float, Form(ge=0, le=100, description="alpha-QE weight exponent.")] = 3.0,
    exclude_self: Annotated[bool, Form(description="Leave the query image out of the results.")] = False,
    min_score: Annotated[
        float | None, Form(ge=-1, le=1, description="Only results at least this similar (cosine).")
    ] = None,
) -> dict[str, Any]:
    settings = state.settings
    if k > settings.max_k:
        raise ApiError(422, "k_too_large", f"k must be at most {settings.max_k}")
    if qe > settings.max_qe:
        raise ApiError(422, "qe_too_large", f"qe must be at most {settings.max_qe}")
    if (image is None) == (id is None):
        raise ApiError(422, "bad_query", "give exactly one of 'image' (a file upload) or 'id'")
    options = {"k": k, "qe": qe, "alpha": alpha, "exclude_self": exclude_self}
    start = time.perf_counter()
    if image is not None:
        data = await image.read()
        hits, query = await state.run(state.model_pool, _search_upload, state, data, options)
    else:
        assert id is not None
        hits = await state.lookup(_search_id, state, id, options)
        query = {"type": "id", "id": id}
    results = [
        {"id": int(h.id), "path": state.paths.public(h.path), "score": float(h.score), **state.urls(request, h.id)}
        for h in hits
        if min_score is None or h.score >= min_score
    ]
    return {
        "query": query,
        "k": k,
        "min_score": min_score,
        "count": len(results),
        "took_ms": round((time.perf_counter() - start) * 1000, 2),
        "results": results,
    }


def _search_upload(state: ServerState, data: bytes, options: dict[str, Any]) -> tuple[list[Hit], dict[str, Any]]:
    """Check the upload from its header, then search by its bytes (model lane).

    The bytes go to the index, which decodes them exactly as it decoded the collection
    (JPEG draft mode included): an indexed file uploaded again gets its own vector back.
    """
    fmt, header = check_upload(data, state.settings, state.index.descriptor.preprocess.resized_size)
    try:
        hits = state.index.search(data, **options)
    except QueryError as exc:
        raise ApiError(422, "undecodable_image", f"the {fmt} image cannot be decoded: {exc}") from exc
    width, height = header.upright_size
    return hits, {"type": "upload", "format": fmt, "width": width, "height": height}


def _search_id(state: ServerState, image_id: int, options: dict[str, Any]) -> list[Hit]:
    """Search by an indexed image's stored vector (look-up lane)."""
    return state.index.search(state.record(image_id).path, **options)
