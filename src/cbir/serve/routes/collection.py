"""``GET /images``: the collection page by page, in catalogue order, with no query needed."""

from __future__ import annotations

from itertools import islice
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from cbir.index import ImageRecord, Index
from cbir.serve.models import CollectionPage
from cbir.serve.state import MAX_ID, State

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
    total, records = await state.lookup(collection_page, state.index, offset, limit)
    items = [
        {"id": rec.id, "path": state.paths.public(rec.path), **state.urls(request, rec.id)} for rec in records
    ]
    return {"total": total, "offset": offset, "limit": limit, "items": items}


def collection_page(index: Index, offset: int, limit: int) -> tuple[int, list[ImageRecord]]:
    """(number of indexed images, the indexed records ``offset`` to ``offset + limit``).

    Walks the catalogue's id-ordered cursor and stops after the page, so memory stays
    one page whatever the collection's size.
    """
    indexed = (rec for rec in index.catalog.records() if rec.status == "ok")
    return len(index), list(islice(indexed, offset, offset + limit))
