"""Model workers: the model configs they serve, and (later) the Celery tasks that run them."""
