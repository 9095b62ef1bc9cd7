"""`GET /metrics`: Prometheus metrics of this API and of the whole cluster (open, like `/healthz`).

Two sources, one scrape:

- This API's HTTP traffic, counted by `prometheus_client` in each API process:
  `localq_http_requests_total{route, method, status}` and
  `localq_http_request_duration_seconds{route, method}` (a histogram). `route` is the URL rule
  that matched (`/v1/chat/completions`, `/v1/models/<model>`), never the raw path, or
  `unmatched`; `method` is the HTTP method (`other` for unusual ones). The duration runs until the
  response starts: the whole answer of a plain call, the opening of an SSE stream (whose
  headers go out at once). Under gunicorn with several worker processes, set
  `PROMETHEUS_MULTIPROC_DIR` to an empty folder before the API starts (`localq api` does): every
  process then writes its samples there and each scrape adds them all up, whichever process
  answers it (prometheus_client's multiprocess mode). Without it, this process's own registry.
- The cluster, read from Redis at scrape time (so every API process reports the same numbers):
  `localq_queue_depth{queue}` (jobs waiting, all priorities: the device queues `cpu` and `gpu`,
  every configured model's queue and every queue a live worker consumes),
  `localq_workers_alive{device}` (`cpu` and `gpu` always present), each live worker's job slots
  (`localq_worker_slots{worker}`, `localq_worker_slots_busy{worker}`) and its batching engines'
  sequences, speed and token counts (`localq_engine_*{worker, model}`: see `worker_slot_metrics`),
  `localq_jobs_total{kind, outcome}`, `localq_job_duration_seconds{kind, model}`,
  `localq_time_to_first_token_seconds{kind, model}`, `localq_tokens_generated_total{kind, model}`
  (see `store.metrics` for what each measures), `localq_dead_letters_total{reason}` (job messages
  the workers set aside: see `store.dead_letters`), and `localq_redis_up` (0 when Redis did not
  answer: the cluster metrics are then left out of the scrape rather than reported as zeros).
- What each project used (`store.usage`, see docs/usage.md): `localq_project_tokens_total{project,
  model, direction}` (input, output), `localq_project_requests_total{project, kind}` and
  `localq_project_batch_lines_total{project, kind}` (kind: the usage category, `completions`,
  `embeddings`, `images`, `audio_speeches`, `audio_transcriptions`),
  `localq_project_images_total{project, model}`, `localq_project_audio_seconds_total{project,
  model}`, `localq_project_audio_characters_total{project, model}`. `project` is the project id
  (`default` on a server without keys); the 50 projects with the most requests are named, the
  others added up as `other`, so the series stay bounded however many projects there are.

`/metrics` asks for no API key, like most Prometheus targets: it shows model names, counts and
timings, never a request's content. Keep it off the public network (or behind the proxy's
auth) if even that is too much.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path

import redis
from flask import Flask, Response, current_app, request

from api.health import monitor_client
from store.heartbeats import live_workers
from store.metrics import READ_KEYS, parse_job_metrics, queue_reads
from store.usage import MAX_PROJECT_LABELS, TOTALS_KEY, parse_totals, project_series
from store.worker_slots import with_slots
from tasks.queue_depths import known_queues, parse_depths, read_depths
from tasks.routing import DEVICES, queue_for

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                float("inf"))
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
_ROUTE = "localq.metrics.route"  # WSGI environ key: the URL rule, set once the request is routed

_lock = threading.Lock()
_http: tuple | None = None  # (requests counter, duration histogram), made once per process


def prepare_multiprocess_dir(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Give the API processes about to be forked one empty samples folder; call it before the
    app is built (`localq api` does, before gunicorn starts).

    PROMETHEUS_MULTIPROC_DIR if it is set (created if needed, its old samples removed: they
    belong to processes of an earlier run), else a new temporary folder, named in the
    environment for this process and the ones it forks, and removed when this process exits.
    """
    configured = environ.get(MULTIPROC_ENV, "").strip()
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix="localq-metrics-"))
    environ[MULTIPROC_ENV] = str(path)
    atexit.register(_remove_folder, path, os.getpid())
    return path


def _remove_folder(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked worker that exits: the folder is shared
        shutil.rmtree(path, ignore_errors=True)


def multiprocess() -> bool:
    """Whether this process writes its samples to PROMETHEUS_MULTIPROC_DIR."""
    _http_metrics()
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _http_metrics() -> tuple:
    """The HTTP metrics, created on first use. prometheus_client picks its storage (in memory, or
    PROMETHEUS_MULTIPROC_DIR files) when it is first imported, which happens here, after
    `localq api` has set the variable; if something imported it earlier, before the variable
    was set, the storage is switched here, before any metric exists."""
    global _http
    with _lock:
        if _http is None:
            from prometheus_client import Counter, Histogram, values

            if os.environ.get(MULTIPROC_ENV):
                Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)
                if not getattr(values.ValueClass, "_multiprocess", False):
                    values.ValueClass = values.MultiProcessValue()
            _http = (
                Counter("localq_http_requests", "HTTP requests answered, by URL rule, method and status.",
                        ["route", "method", "status"]),
                Histogram("localq_http_request_duration_seconds",
                          "Seconds until the response started (for SSE: until the stream opened), "
                          "by URL rule and method.", ["route", "method"], buckets=HTTP_BUCKETS),
            )
        return _http


def install_metrics(app: Flask) -> None:
    """Count every request the app answers, and serve `GET /metrics`."""
    requests_total, duration = _http_metrics()

    @app.after_request
    def _note_route(response):
        rule = request.url_rule
        request.environ[_ROUTE] = rule.rule if rule is not None else UNMATCHED
        return response

    app.wsgi_app = _RequestCounter(app.wsgi_app, requests_total, duration)
    app.add_url_rule("/metrics", "metrics", _metrics_view, methods=["GET"])


class _RequestCounter:
    """WSGI middleware: one sample per response, taken when the response starts (so a stream is
    counted as soon as it opens, and its body passes through untouched)."""

    def __init__(self, wsgi_app, requests_total, duration):
        self.wsgi_app = wsgi_app
        self.requests_total = requests_total
        self.duration = duration

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        counted = False

        def counting_start_response(status, headers, exc_info=None):
            nonlocal counted
            if not counted:
                counted = True
                self._count(environ, status.split(" ", 1)[0], time.perf_counter() - started)
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, counting_start_response)
        except BaseException:
            if not counted:  # the server answers 500 for an error that escaped the app
                counted = True
                self._count(environ, "500", time.perf_counter() - started)
            raise

    def _count(self, environ, status: str, seconds: float) -> None:
        route = environ.get(_ROUTE, UNMATCHED)
        method = environ.get("REQUEST_METHOD", "")
        method = method if method in METHODS else "other"
        try:
            self.requests_total.labels(route, method, status).inc()
            self.duration.labels(route, method).observe(seconds)
        except Exception:  # a sample lost (say, its folder is full) never fails the request
            log.warning("request not counted in the metrics", exc_info=True)


def _metrics_view() -> Response:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry()
    if multiprocess():
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(ClusterCollector(monitor_client(), model_queues()))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), headers={"Content-Type": content_type})


class _Forward:
    """Another registry's metrics, as one collector (this process's own, in single-process mode)."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


def model_queues() -> list[str]:
    """The queue of every configured model (its device's, or its GPUs' or pool's)."""
    return sorted({queue_for(config) for config in current_app.extensions["localq.models"].list()})


class ClusterCollector:
    """Queue depths, live workers and job metrics, read from Redis when scraped."""

    def __init__(self, client: redis.Redis, queues=()):
        self.client = client
        self.queues = tuple(queues)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString


        up = GaugeMetricFamily("localq_redis_up", "1 when the queue's Redis answered this scrape, else 0.")
        try:
            workers = live_workers(self.client)
            queues = known_queues(self.queues, workers)
            pipe = self.client.pipeline(transaction=False)
            position = read_depths(pipe, queues)
            queue_reads(pipe)
            pipe.hgetall(TOTALS_KEY)
            replies = pipe.execute()
        except (redis.RedisError, OSError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        depth = GaugeMetricFamily("localq_queue_depth", "Jobs waiting in a queue, all priorities.", labels=["queue"])
        for queue, waiting in parse_depths(replies, queues).items():
            depth.add_metric([queue], waiting.total)
        yield depth

        alive = GaugeMetricFamily("localq_workers_alive", "Workers with a live heartbeat, by device.",
                                  labels=["device"])
        per_device = dict.fromkeys(DEVICES, 0)
        for worker in workers:
            device = worker.get("device")
            device = device if isinstance(device, str) and device else "unknown"
            per_device[device] = per_device.get(device, 0) + 1
        for device, count in sorted(per_device.items()):
            alive.add_metric([device], count)
        yield alive
        yield from worker_slot_metrics([with_slots(worker) for worker in workers])

        jobs = parse_job_metrics(replies[position:position + len(READ_KEYS)])
        total = CounterMetricFamily("localq_jobs", "Jobs finished, by kind and final status.",
                                    labels=["kind", "outcome"])
        for (kind, outcome), count in sorted(jobs.jobs.items()):
            total.add_metric([kind, outcome], count)
        yield total

        tokens = CounterMetricFamily("localq_tokens_generated", "Completion tokens generated, by kind and model.",
                                     labels=["kind", "model"])
        for (kind, model), count in sorted(jobs.tokens.items()):
            tokens.add_metric([kind, model], count)
        yield tokens

        dead = CounterMetricFamily("localq_dead_letters",
                                   "Job messages set aside in the dead letters (`localq dead-letters`), by reason.",
                                   labels=["reason"])
        for reason, count in sorted(jobs.dead_letters.items()):
            dead.add_metric([reason], count)
        yield dead

        for name, doc, histograms in (
            ("localq_job_duration_seconds",
             "Seconds from a worker taking a job to its final event, by kind and model.", jobs.duration),
            ("localq_time_to_first_token_seconds",
             "Seconds from a worker taking a job to its first output (token, audio or image piece), "
             "by kind and model; queue wait not included.", jobs.ttft),
        ):
            family = HistogramMetricFamily(name, doc, labels=["kind", "model"])
            for (kind, model), histogram in sorted(histograms.items()):
                family.add_metric([kind, model], [(floatToGoString(b), n) for b, n in histogram.buckets],
                                  histogram.sum)
            yield family
        yield from project_usage_metrics(parse_totals(replies[position + len(READ_KEYS)]))


PROJECT_NOTE = (f"; at most {MAX_PROJECT_LABELS} projects (those with the most requests) are named, "
                "the others added up as project=\"other\"")


def project_usage_metrics(totals):
    """What each project used since the first job (`store.usage`'s totals), as counters labelled
    by project: tokens by model and direction, requests and batch lines by usage category
    (completions, embeddings, images, audio_speeches, audio_transcriptions), images, audio seconds
    and characters by model."""
    from prometheus_client.core import CounterMetricFamily

    series = project_series(totals)
    for name, doc, labels, values in (
        ("localq_project_tokens", "Tokens used, by project, model and direction (input: prompt tokens, "
         "output: generated tokens)", ["project", "model", "direction"], series.tokens),
        ("localq_project_requests", "Requests that succeeded (batch lines included), by project and usage category",
         ["project", "kind"], series.requests),
        ("localq_project_batch_lines", "Batch lines that succeeded, by project and usage category",
         ["project", "kind"], series.batch_lines),
        ("localq_project_images", "Images generated or edited, by project and model", ["project", "model"],
         series.images),
        ("localq_project_audio_seconds", "Seconds of audio transcribed or translated, by project and model",
         ["project", "model"], series.audio_seconds),
        ("localq_project_audio_characters", "Characters of text spoken (speech), by project and model",
         ["project", "model"], series.audio_characters),
    ):
        family = CounterMetricFamily(name, doc + PROJECT_NOTE + ".", labels=labels)
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        yield family


ENGINE_GAUGES = (
    ("localq_engine_running_sequences", "running",
     "Sequences a batching engine is decoding now (prompt or output)."),
    ("localq_engine_waiting_sequences", "waiting",
     "Sequences submitted to a batching engine, not yet given a slot."),
    ("localq_engine_tokens_per_second", "tokens_per_second",
     "Tokens a batching engine generated per second over the last few seconds."),
)
ENGINE_COUNTERS = (
    ("localq_engine_generated_tokens", "generated_tokens",
     "Tokens a batching engine generated since its model loaded."),
    ("localq_engine_prompt_tokens", "prompt_tokens",
     "Prompt tokens of the sequences a batching engine admitted since its model loaded."),
    ("localq_engine_cached_tokens", "cached_tokens",
     "Of those prompt tokens, the ones found in the engine's prefix cache."),
    ("localq_engine_steps", "steps", "Batches a batching engine decoded since its model loaded."),
)


def worker_slot_metrics(workers: list[dict]):
    """Job slots per worker and the batching engines per worker and model, from heartbeats read
    through `store.worker_slots.with_slots`. The engine counters restart at 0 when a model is
    loaded again (Prometheus' rate() treats that as a counter reset)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    slots = GaugeMetricFamily("localq_worker_slots", "Jobs a worker runs at once.", labels=["worker"])
    busy = GaugeMetricFamily("localq_worker_slots_busy", "Jobs a worker is running now.", labels=["worker"])
    for worker in workers:
        slots.add_metric([str(worker["id"])], worker["slots"])
        busy.add_metric([str(worker["id"])], worker["slots_busy"])
    yield slots
    yield busy
    engines = [(str(worker["id"]), model, stats)
               for worker in workers for model, stats in sorted(worker["engines"].items())]
    for family, (name, key, doc) in [*((GaugeMetricFamily, g) for g in ENGINE_GAUGES),
                                     *((CounterMetricFamily, c) for c in ENGINE_COUNTERS)]:
        metric = family(name, doc, labels=["worker", "model"])
        for worker_id, model, stats in engines:
            metric.add_metric([worker_id, model], stats[key])
        yield metric

