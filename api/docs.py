"""`/docs`: Swagger UI 5 for `/openapi.json` (an OpenAPI 3.1 document), served from the dist
folder of the flask-swagger-ui package, so nothing is fetched from a CDN."""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, render_template_string, send_from_directory, url_for

blueprint = Blueprint("docs", __name__)

#: Served by `api.openapi.blueprint`.
SPEC_URL = "/openapi.json"
#: Swagger UI's own build (swagger-ui-bundle.js, swagger-ui.css, ...); read, never imported.
SWAGGER_UI_DIST = str(files("flask_swagger_ui") / "dist")

_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
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
        displayOperationId: true,
        filter: true,  // a box that narrows the (long) list to the tags matching it
        validatorUrl: null,  // Swagger UI would otherwise send the document to validator.swagger.io
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
    return send_from_directory(SWAGGER_UI_DIST, filename)
