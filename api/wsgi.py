"""WSGI entry point for servers given a module path: `gunicorn api.wsgi:app`."""

from api.app import create_app

app = create_app()
