"""`/docs`: Swagger UI for `/openapi.json`, served from the swagger-ui-bundle package (no CDN)."""

from __future__ import annotations

from flask import Blueprint, render_template_string, send_from_directory, url_for
from swagger_ui_bundle import swagger_ui_path

blueprint = Blueprint("docs", __name__)

#: Served by `api.openapi.blueprint`.
SPEC_URL = "/openapi.json"

_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>localq API</title>
    <link rel="stylesheet" href="{{ asset('swagger-ui.css') }}">
    <link rel="icon" type="image/png" href="{{ asset('favicon-32x32.png') }}" sizes="32x32">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{{ asset('swagger-ui-bundle.js') }}"></script>
    <script src="{{ asset('swagger-ui-standalone-preset.js') }}"></script>
    <script>
      window.ui = SwaggerUIBundle({
        url: {{ spec_url | tojson }},
        dom_id: "#swagger-ui",
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        layout: "StandaloneLayout",
      });
    </script>
  </body>
</html>
"""


@blueprint.get("/docs")
def page():
    """The Swagger UI page, pointed at this server's own spec."""
    return render_template_string(
        _PAGE,
        asset=lambda filename: url_for("docs.asset", filename=filename),
        spec_url=SPEC_URL,
    )


@blueprint.get("/docs/<path:filename>")
def asset(filename: str):
    """Swagger UI's JS, CSS and icons, straight from the installed package."""
    return send_from_directory(swagger_ui_path, filename)
