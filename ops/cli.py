"""The `localq` command: serve the API (`api`, `up`) and inspect model configs (`models`)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import replace

from gunicorn.app.base import BaseApplication
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api import create_app
from api.settings import Settings
from workers.config import ModelConfigError
from workers.registry import ModelRegistry

DEFAULT_THREADS = 8


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `localq` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        settings = _settings(args)
        return args.command(args, settings)
    except (ModelConfigError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localq", description=__doc__)
    parser.add_argument("--models-dir", help="model config folder (default: LOCALQ_MODELS_DIR)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = argparse.ArgumentParser(add_help=False)
    serve.add_argument("--host", help="bind address (default: LOCALQ_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default: LOCALQ_PORT or 8080)")
    serve.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    serve.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="threads per worker (gthread)"
    )

    api = commands.add_parser("api", parents=[serve], help="serve the HTTP API with gunicorn")
    api.set_defaults(command=_run_api)

    up = commands.add_parser("up", parents=[serve], help="start localq on this machine")
    up.add_argument(
        "--force-public",
        action="store_true",
        help="allow binding a non-loopback address (the API has no authentication)",
    )
    up.set_defaults(command=_run_up)

    models = commands.add_parser("models", help="list the configured models")
    models.set_defaults(command=_run_models)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by whichever flags were given."""
    overrides = {
        "models_dir": args.models_dir,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    settings = Settings.from_env()
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _run_api(args: argparse.Namespace, settings: Settings, on_ready=None) -> int:
    """Load the app first (bad configs fail here, clearly), then hand it to gunicorn."""
    options = {
        "bind": host_port(settings.host, settings.port),
        "worker_class": "gthread",
        "workers": args.workers,
        "threads": args.threads,
    }
    if on_ready is not None:
        options["when_ready"] = lambda arbiter: on_ready()
    GunicornServer(create_app(settings), options).run()  # returns via SystemExit
    return 0


def _run_up(args: argparse.Namespace, settings: Settings) -> int:
    """Like `api`, but guarded for laptops and announcing the URL when listening."""
    if not args.force_public and not is_loopback(settings.host):
        Console(stderr=True).print(
            f"[bold red]refusing to bind {escape(settings.host)}:[/] it is not a loopback address "
            "and the API has no authentication; pass --force-public to expose it anyway.",
            highlight=False,
        )
        return 2
    url = f"http://{host_port(settings.host, settings.port)}"

    def announce() -> None:
        Console().print(f"localq ready on [bold]{escape(url)}[/]", highlight=False)

    return _run_api(args, settings, on_ready=announce)


def _run_models(args: argparse.Namespace, settings: Settings) -> int:
    """A table of the configured models, validating every file on the way."""
    registry = ModelRegistry.load(settings.models_dir)
    table = Table("name", "aliases", "backend", "device", title=f"models in {settings.models_dir}")
    for config in registry.list():
        cells = (config.name, ", ".join(config.aliases), config.backend or "-", config.device)
        table.add_row(*map(escape, cells))
    Console().print(table)
    return 0


class GunicornServer(BaseApplication):
    """Gunicorn's documented custom-application hook: serve an app object we built."""

    def __init__(self, app, options: dict):
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        # Gunicorn 25.1+ opens a control socket at one shared per-user path by default;
        # localq does not use it, and two instances would fight over it.
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self):
        return self._app


def host_port(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 addresses as both gunicorn and URLs require."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IPs; hostnames are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
