"""One module per `localq` subcommand, each with a `run(args, settings) -> int`; the parser and the
dispatch are ops/cli.py, `localq up` is ops/up.py. ops/cli.py imports a subcommand's module only when
that subcommand runs (`batch` excepted: it registers its own parser and imports `openai` only when it
runs), so `localq --help` and `import ops.cli` load no gunicorn server, launcher, Celery or model library.
"""
