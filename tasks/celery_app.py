"""The Celery application: a Redis broker, reliability settings, and one queue per device tag.

Why each setting (see Celery's "Optimizing" and "Tasks: acks_late" guides):
- late acks + reject on worker lost: a job whose worker dies is put back on the queue, not lost;
  `tasks.run` counts deliveries so a job that kills every worker ends as failed instead of looping;
- prefetch multiplier 1: a worker holds only the jobs it runs (one per job slot: Celery's threads
  pool with one thread per sequence its text models batch, `workers.slots`, else one prefork
  process), so a long job does not sit on others;
- the broker's visibility timeout is longer than the longest allowed job, so a running job is not
  handed to a second worker while the first is still on it;
- JSON only, soft and hard time limits, no result backend (results travel on the job event log);
- priorities: kombu's Redis transport keeps one list per priority step and pops the lowest step
  first, so interactive calls (0) are taken before batch lines (9) waiting on the same queue;
- a worker's own task messages (batch lines, finalize) are published with retries for about 38 s,
  so a Redis restart in the middle of a batch delays a send instead of losing it; the API keeps
  Celery's short default, so a request answers 503 soon when Redis is gone;
- every worker's main process runs the batch expiry sweep (`tasks.sweeper.BatchSweep`, a worker
  bootstep on the worker's timer), one worker per `LOCALQ_BATCH_SWEEP_INTERVAL` across machines;
- the worker and its consumer are `tasks.handoff`'s: a message the main process cannot decode or
  hand to a pool process fails its own job and goes to the dead letters, instead of stopping the
  worker (and every worker after it: late acks bring it back).
"""

from __future__ import annotations

from celery import Celery, signals
from kombu import Queue
from kombu.utils.objects import cached_property

# Only configuration: two leaf modules (settings from the environment, the queue layout). The
# tasks, the worker classes and the sweep bootstep are named by string, so no module that uses
# the app is imported here.
from tasks.redis_url import broker_settings
from tasks.routing import DEVICE_QUEUES, PRIORITIES, PRIORITY_STEPS
from tasks.settings import QueueSettings

# kombu's Connection.ensure policy: waits 0.1, 0.6, then 1 s per try
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": 40, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1.0}


class LocalqCelery(Celery):
    """Celery, whose `celery worker` runs `tasks.handoff.Worker`."""

    @cached_property
    def Worker(self):  # noqa: N802 - Celery's name
        return self.subclass_with_self("tasks.handoff:Worker")


def make_app(settings: QueueSettings | None = None) -> Celery:
    settings = settings or QueueSettings.from_env()
    broker_url, sentinel_options, broker_ssl = broker_settings(settings.redis_url)
    app = LocalqCelery("localq", broker=broker_url,
                       include=["tasks.run", "tasks.batch_run", "tasks.worker_signals"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_soft_time_limit=settings.job_timeout,
        task_time_limit=settings.hard_limit,
        task_queues=[Queue(name) for name in DEVICE_QUEUES],
        task_default_queue="cpu",
        task_default_priority=PRIORITIES["interactive"],
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            **sentinel_options,
        },
        broker_use_ssl=broker_ssl,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="tasks.handoff:Consumer",
    )
    app.localq_settings = settings
    app.steps["worker"].add("tasks.sweeper:BatchSweep")  # loaded by name when a worker starts
    return app


app = make_app()


@signals.worker_init.connect
def _worker_publish_rides_over_restarts(sender=None, **_) -> None:
    """In a worker (main process, before its pool forks): retry publishing for longer."""
    worker_app = getattr(sender, "app", None) or app
    worker_app.conf.task_publish_retry_policy = dict(WORKER_PUBLISH_RETRY_POLICY)
    # the task sender copies the policy when first built; build it again from the new one
    worker_app.amqp.__dict__.pop("send_task_message", None)
