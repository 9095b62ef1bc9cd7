"""localq's HTTP API: a Flask app answering OpenAI's API under `/v1` (the factory: `api.app.create_app`).

Importing this package must stay cheap (no torch, llama_cpp or model libraries, and not even
Flask: `localq --help` reads `api.settings`): the API process only validates and queues; workers
run models.
"""
