"""Model workers: model configs (`config`, `registry`), what each backend can honour
(`capabilities`, `sampling`), loaded models (`cache`, `backends`) and the job entry point
(`execute`). Only `workers.backends.*` modules import model libraries, and only when a model
is loaded; everything else here is light enough for the API process.
"""
