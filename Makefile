# Everything runs from the project virtualenv; `make test` and `make run` create it.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: $(VENV) run test generate

$(VENV): $(STAMP)

# Re-install whenever pyproject.toml changes; otherwise this is a no-op.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e '.[dev]'
	touch $@

$(PYTHON):
	python3 -m venv $(VENV)

run: $(VENV)
	$(VENV)/bin/localq up

test: $(VENV)
	$(PYTHON) -m pytest -q

generate: $(VENV)
	$(PYTHON) -m schemas.generate
