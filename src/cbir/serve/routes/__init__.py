"""The API's routers, one module per part: search, images, collection, admin, pages."""

from cbir.serve.routes import admin, collection, images, pages, search

ROUTERS = (search.router, collection.router, images.router, admin.router, pages.router)

__all__ = ["ROUTERS"]
