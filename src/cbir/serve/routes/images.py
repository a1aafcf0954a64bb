"""One image by catalogue id: its file, thumbnail and facts; adding and removing images.

Files are only ever named by catalogue id: the request names an id, the catalogue
names the file, and :class:`cbir.serve.paths.PathPolicy` decides whether it may be sent.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException

from cbir.data.decode import DecodeError, read_header
from cbir.serve.errors import ApiError
from cbir.serve.models import AddResponse, ImageInfo, RemoveResponse
from cbir.serve.security import MIME_TYPES, sniff_file_format
from cbir.serve.state import ImageId, ServerState, State, require_writer
from cbir.serve.uploads import check_upload, delete_upload, store_and_add

log = logging.getLogger("cbir.serve")
router = APIRouter(tags=["images"])

_NOT_FOUND = {404: {"description": "Not in the catalogue, or its file is gone"}}
_NEEDS_TOKEN = {401: {"description": "Missing or wrong token"}, 403: {"description": "Read-only server"}}
_CACHE = {"Cache-Control": "private, max-age=300"}


@router.get(
    "/images/{image_id}",
    summary="The original file of an indexed image",
    responses={200: {"content": {"image/jpeg": {}}}, **_NOT_FOUND},
)
async def get_image(image_id: ImageId, state: State) -> FileResponse:
    _, path = await state.lookup(state.catalogue_file, image_id)
    fmt = sniff_file_format(path)
    if fmt is None:
        raise ApiError(404, "image_missing", f"the file of image {image_id} is no longer an image")
    return FileResponse(
        path,
        media_type=MIME_TYPES[fmt],
        filename=os.path.basename(path),
        content_disposition_type="inline",
        headers=_CACHE,
    )


@router.get(
    "/images/{image_id}/info",
    response_model=ImageInfo,
    summary="Path, pixel size and file size of an indexed image",
    responses=_NOT_FOUND,
)
async def get_info(image_id: ImageId, request: Request, state: State) -> dict[str, Any]:
    return {**await state.lookup(_info, state, image_id), **state.urls(request, image_id)}


def _info(state: ServerState, image_id: int) -> dict[str, Any]:
    """The facts the page's large view shows; the pixel size comes from the header only."""
    rec, path = state.catalogue_file(image_id)
    try:
        header = read_header(path)
    except DecodeError as exc:
        raise ApiError(404, "image_unreadable", f"image {image_id} cannot be read") from exc
    stat = os.stat(path)
    width, height = header.upright_size
    return {
        "id": rec.id,
        "path": state.paths.public(rec.path),
        "format": header.format,
        "width": width,
        "height": height,
        "bytes": stat.st_size,
        "modified": stat.st_mtime,
    }


@router.get(
    "/thumbnails/{image_id}",
    summary="A JPEG thumbnail of an indexed image (cached)",
    responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "Not modified"}, **_NOT_FOUND},
)
async def get_thumbnail(image_id: ImageId, request: Request, state: State) -> Response:
    def make() -> Any:
        _, path = state.catalogue_file(image_id)
        try:
            return state.thumbnails.get(image_id, path)
        except (DecodeError, OSError) as exc:
            log.warning("thumbnail of id %d failed: %s", image_id, exc)
            raise ApiError(404, "image_unreadable", f"image {image_id} cannot be decoded") from exc

    thumb = await state.lookup(make)
    headers = {"ETag": thumb.etag, **_CACHE}
    if request.headers.get("if-none-match") == thumb.etag:
        return Response(status_code=304, headers=headers)
    return Response(thumb.data, media_type=thumb.media_type, headers=headers)


_IMAGE_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "Image to store and index."}
                    },
                }
            }
        },
    }
}


@router.post(
    "/images",
    status_code=201,
    dependencies=[Depends(require_writer)],
    response_model=AddResponse,
    summary="Add an image (needs the token)",
    responses={200: {"description": "Already indexed"}, 503: {"description": "Another writer is busy"}, **_NEEDS_TOKEN},
    openapi_extra=_IMAGE_FORM,
)
async def add_image(request: Request, state: State) -> JSONResponse:
    # The form is parsed here, after the token check (a dependency), so unauthenticated
    # clients cannot make the server receive and spool an upload first.
    try:
        form = await request.form(max_files=1, max_fields=4)
    except HTTPException:
        raise
    except Exception as exc:
        raise ApiError(400, "bad_form", "expected a multipart/form-data body with an 'image' file") from exc
    upload = form.get("image")
    if not isinstance(upload, StarletteUploadFile):
        raise ApiError(422, "bad_query", "the form needs an 'image' file field")
    data = await upload.read()
    upload_dir = state.settings.upload_dir
    assert upload_dir is not None  # ServeSettings.validate() guarantees it when writes are on

    def add() -> tuple[int, str, bool]:
        fmt, _ = check_upload(data, state.settings, state.index.descriptor.preprocess.resized_size)
        return store_and_add(state.index, data, fmt, upload_dir)

    image_id, path, added = await state.write(add)
    body = {"id": image_id, "path": state.paths.public(path), "added": added}
    return JSONResponse(body, status_code=201 if added else 200)


@router.delete(
    "/images/{image_id}",
    response_model=RemoveResponse,
    summary="Remove an image (needs the token)",
    dependencies=[Depends(require_writer)],
    responses={**_NEEDS_TOKEN, **_NOT_FOUND},
)
async def remove_image(image_id: ImageId, state: State) -> dict[str, int]:
    def remove() -> None:
        rec = state.index.get(image_id)
        if rec is None or not state.index.remove([image_id]):
            raise ApiError(404, "image_not_found", f"no image with id {image_id} in the catalogue")
        if state.paths.is_upload(rec.path):  # never a file of an indexed collection
            delete_upload(rec.path)

    await state.write(remove)
    return {"removed": image_id}
