"""The app factory: the Flask app with its error handlers, auth, blueprints and the /v1 router.

No torch, llama_cpp or model libraries: the API process only validates and queues; workers run models.
"""

from __future__ import annotations

from flask import Flask

from api.auth import install_auth, install_cors
from api.body import BodyGuard
from api.console import blueprint as console_blueprint
from api.docs import blueprint as docs_blueprint
from api.generated import blueprint as generated_blueprint
from api.errors import register_error_handlers
from api.health import blueprint as health_blueprint
from api.metrics import install_metrics
from api.openapi import blueprint as openapi_blueprint
from api.operations import register_operations
from api.rate_limits import install_rate_limits
from api.routes import collect_handlers
from api.settings import Settings
from workers.registry import ModelRegistry


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; an invalid model config raises here so start-up stops."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["LOCALQ"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["localq.models"] = ModelRegistry.load(settings.models_dir)

    register_error_handlers(app)
    # Before any other request hook, so an unauthenticated request does no work at all.
    install_auth(app, settings.api_keys)
    install_cors(app, settings.cors_origins)
    app.register_blueprint(openapi_blueprint)
    app.register_blueprint(docs_blueprint)
    app.register_blueprint(console_blueprint)  # `/` for browsers: the web console
    app.register_blueprint(generated_blueprint)
    register_operations(app, collect_handlers())
    install_rate_limits(app)  # x-ratelimit-* headers on the answers to rate-limited requests
    # /healthz, /readyz and /metrics: plain routes outside /v1, so no key is asked for them
    app.register_blueprint(health_blueprint)
    install_metrics(app)
    app.wsgi_app = BodyGuard(app.wsgi_app, settings.body_read_timeout)  # type: ignore[method-assign]
    return app
