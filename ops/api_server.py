"""The API's HTTP server: gunicorn with gevent workers, answering its own errors as OpenAI does.

Why gevent: an SSE stream lasts as long as its job, and a slow client holds its request until
LOCALQ_BODY_READ_TIMEOUT; with gunicorn's gthread worker each of them held one of 64 threads, so
70 stalled clients starved `/healthz`. The gevent worker serves every connection on a greenlet:
open streams (blocked in Redis XREAD) and stalled clients (blocked in recv) cost a little memory
each, and `worker_connections` bounds how many one process takes. gunicorn's worker
monkey-patches the standard library when it starts, before it builds the app (the app is built in
the worker, not in the master), so redis-py, kombu, `select` and `threading.Timer` all yield to
other greenlets instead of blocking the process. The flip side: nothing caps concurrent requests
below `worker_connections` any more, so each pool they draw from must hold that many (redis-py's
pools default to 100 connections, and every open stream holds one while it waits in XREAD); and
a CPU-bound request (parsing a 50 MB JSON body: about half a second) holds up the others for as
long as it runs.

gunicorn answers requests it cannot parse (request line too long, too many or too large
headers, bad framing) itself, with an HTML page; `ApiWorker.handle_error` answers them with
OpenAI's error envelope instead.
"""

from __future__ import annotations

import json
import resource
import warnings
from contextlib import contextmanager
from http import HTTPStatus

import gevent
from gevent.monkey import MonkeyPatchWarning
from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker

from api.errors import APIError
from ops.common import DEFAULT_CONNECTIONS  # noqa: F401  # kept there: the `localq` parser shows it without gunicorn

WORKER_CLASS = f"{__name__}.ApiWorker"
# The worker's heartbeat to the master, sent by its main greenlet about every second; a worker
# that misses it this long is replaced. It never cuts a request short. Generous, so that a long
# CPU-bound request (parsing a 64 MB body) is not mistaken for a hang.
GUNICORN_TIMEOUT = 300
# Seconds an idle keep-alive connection stays open (SDK clients reuse connections between calls:
# submit, then poll or stream); also the bound on receiving a request's line and headers.
GUNICORN_KEEPALIVE = 15
# On stop, in-flight requests (open streams) get this long before the worker exits; clients
# can resume a job's stream from another API process.
GUNICORN_GRACEFUL_TIMEOUT = 10
# File descriptors per connection: its socket, and a Redis connection while it streams.
FDS_PER_CONNECTION = 2
SPARE_FDS = 256

BAD_REQUEST = "We could not parse the request. Check that it is well-formed."
# gevent warns that ssl was imported before it patched it, naming the modules that kept the
# unpatched SSLContext. The master imports redis (so redis.asyncio) before the worker patches:
# that one module is harmless (the API never uses redis.asyncio), so its warning alone is dropped;
# any other module named would still be reported.
_SSL_IMPORTED_EARLY = (r"Monkey-patching ssl after ssl has already been imported.*"
                       r"Modules that had direct imports \(NOT patched\): \['redis\.asyncio\.connection [^\]]*\]\. $")


def gunicorn_options(host: str, port: int, workers: int, connections: int) -> dict:
    """Gunicorn settings for `localq api`; see the constants above for why each value."""
    return {
        "bind": host_port(host, port),
        "worker_class": WORKER_CLASS,
        "workers": workers,
        "worker_connections": connections,
        "timeout": GUNICORN_TIMEOUT,
        "keepalive": GUNICORN_KEEPALIVE,
        "graceful_timeout": GUNICORN_GRACEFUL_TIMEOUT,
    }


def host_port(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 addresses as both gunicorn and URLs require."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft open-files limit (inherited by the workers) to what `connections`
    need, within the hard limit: the common default of 1024 would refuse connections long before
    `worker_connections` does. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * FDS_PER_CONNECTION + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class GunicornServer(BaseApplication):
    """Gunicorn's documented custom-application hook: serve the app `factory` builds.

    The factory runs in each worker, after the gevent worker has monkey-patched the standard
    library (the master never builds the app), so nothing in the app holds an unpatched lock or socket.
    """

    def __init__(self, factory, options: dict):
        self._factory = factory
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
        app = self._factory()
        gevent.spawn(_prepare_sending)  # once this worker's loop runs: /healthz never waits for Redis
        return app


def _prepare_sending() -> None:
    """Celery's producer, built before the first job needs it (`tasks.dispatch.prepare`)."""
    # here: tasks.dispatch builds the Celery app, which reads its broker (LOCALQ_REDIS_URL) when
    # imported, and `localq up` imports this module before it has started Redis
    from tasks.dispatch import prepare

    prepare()


def server_error(exc: BaseException) -> APIError | None:
    """What to answer for an error gunicorn raised before the app ran; None: not the client's fault."""
    if isinstance(exc, (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName)):
        return None  # a header the app tried to send: the app's fault
    if isinstance(exc, http_errors.LimitRequestLine):
        limit = f" ({exc.max_size} bytes)" if getattr(exc, "max_size", None) else ""
        return APIError(414, f"The request line (method, URL and version) is longer than this server accepts{limit}.",
                        code="uri_too_long")
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return APIError(431, "The request headers are too large or too many.", code="headers_too_large")
    if isinstance(exc, http_errors.UnsupportedTransferCoding):
        return APIError(501, "The request's Transfer-Encoding is not supported; send the body with a "
                             "Content-Length or chunked.", code="unsupported_transfer_encoding")
    if isinstance(exc, http_errors.ExpectationFailed):
        return APIError(417, "The request's Expect header cannot be met.", code="expectation_failed")
    if isinstance(exc, http_errors.ForbiddenProxyRequest):
        return APIError(403, "Proxy requests are not accepted from this address.", code="forbidden")
    if isinstance(exc, (http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator,
                        http_errors.InvalidChunkExtension)):
        return APIError(400, "The request body is malformed: its chunked encoding could not be read.",
                        code="invalid_body")
    if isinstance(exc, http_errors.ConfigurationProblem):
        return None
    if isinstance(exc, http_errors.ParseException):
        return APIError(400, BAD_REQUEST, code="bad_request")
    return None


def error_bytes(err: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying `err`; the connection closes after it."""
    body = json.dumps(err.body(), separators=(",", ":")).encode()
    reason = HTTPStatus(err.status).phrase
    head = (f"HTTP/1.1 {err.status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _Stopping(Exception):
    """Thrown into a greenlet that waits for a connection's next request when the worker stops."""


class ApiWorker(GeventWorker):
    """gunicorn's gevent worker, answering what it cannot parse with OpenAI-shaped JSON, and
    closing idle keep-alive connections as soon as it is asked to stop (gunicorn's own waits for
    each to time out, so every stop took the whole graceful timeout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: set = set()  # greenlets waiting for the next request on a kept-alive connection

    @contextmanager
    def timeout_ctx(self):
        """Around reading a connection's next request: at most `keepalive` seconds, none once stopping."""
        me = gevent.getcurrent()
        self._waiting.add(me)
        try:
            with gevent.Timeout(self.cfg.keepalive if self.alive else 0, False):
                yield
        except _Stopping:
            pass  # the connection closes, as when the keep-alive time is up
        finally:
            self._waiting.discard(me)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # stop accepting; requests under way finish, then close
        gevent.spawn(self._stop_waiting)  # out of the signal handler, as gunicorn does for SIGQUIT

    def _stop_waiting(self) -> None:
        loop = gevent.get_hub().loop
        for greenlet in list(self._waiting):
            loop.run_callback(self._throw_if_waiting, greenlet)

    def _throw_if_waiting(self, greenlet) -> None:
        # Run by the hub, so no greenlet moves between the check and the throw: one that got its
        # request meanwhile is serving it, and is left alone.
        if greenlet in self._waiting:
            greenlet.throw(_Stopping)

    def patch(self):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SSL_IMPORTED_EARLY, category=MonkeyPatchWarning)
            super().patch()

    def handle_error(self, req, client, addr, exc):
        err = server_error(exc)
        if err is None:
            self.log.exception("Error handling request")
            err = APIError(500, "The server had an error while processing your request.", type="server_error")
        else:
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        try:
            util.write_nonblock(client, error_bytes(err))
        except Exception:
            self.log.debug("Failed to send error message.")
