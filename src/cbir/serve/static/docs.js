// Starts Swagger UI (served by this server, see routes/pages.py) on this server's own
// OpenAPI schema. A separate file rather than an inline script, so the page keeps the
// same strict Content-Security-Policy as the search page. The URL is relative, so the
// docs also work behind a reverse proxy that serves the app under a path prefix.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
  });
});
