"""``GET /images``: the collection page by page, in catalogue order, with no query needed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from cbir.serve.models import CollectionPage
from cbir.serve.state import MAX_ID, ServerState, State

router = APIRouter(tags=["collection"])

#: Most images one page may list (the page's grid shows 48).
MAX_PAGE = 200


@router.get(
    "/images",
    response_model=CollectionPage,
    summary="Browse the collection: indexed images, a page at a time",
)
async def list_images(
    request: Request,
    state: State,
    offset: Annotated[int, Query(ge=0, le=MAX_ID, description="Images to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Images on this page.")] = 48,
) -> dict[str, Any]:
    total, page = await state.lookup(collection_page, state, offset, limit)
    items = [{"id": i, "path": state.paths.public(path), **state.urls(request, i)} for i, path in page]
    return {"total": total, "offset": offset, "limit": limit, "items": items}


def collection_page(state: ServerState, offset: int, limit: int) -> tuple[int, list[tuple[int, str]]]:
    """(number of indexed images, (id, path) of those ``offset`` to ``offset + limit``)."""
    all_ids = state.collection_ids()
    page = [int(i) for i in all_ids[offset : offset + limit]]
    paths = state.index.catalog.paths_for(page)
    return len(all_ids), [(i, paths[i]) for i in page if i in paths]
