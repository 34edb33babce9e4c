# visual-memory — every target installs what it needs first, so each works on a fresh machine.
#   make demo   build a real memory from Fashion-MNIST with the bundled encoder (DirectRunner)
#   make serve  serve the demo memory on http://127.0.0.1:8080/ (classify API and the page)
#   make test   the default test suite (offline, CPU, ~minutes)
#   make test-portable  every job on Beam's PortableRunner with workers that have only the staged sdist
#   make paper  the paper's findings as experiments on Fashion-MNIST and MNIST (see docs/paper.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VMEM := $(VENV)/bin/vmem
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt setup.py | sha1sum | cut -c1-12)
DATA ?= data
OUT ?= out
export TF_CPP_MIN_LOG_LEVEL ?= 1
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install demo serve test test-all test-portable bench paper clean fashion-mnist chromium

install: $(STAMP) fashion-mnist chromium

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# The bundled dataset is a Debian package (MIT): /usr/share/datasets/fashion-mnist.
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' once, then re-run make." >&2; exit 1; \
	fi

# The tests open every report.html in a real headless browser, and drive the `vmem serve` page through
# chromedriver: Debian's chromium and chromium-driver packages.
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; \
	else \
	  echo "Chromium or chromedriver is missing (the report.html and page tests use them): run 'sudo apt-get install chromium chromium-driver' once, then re-run make." >&2; exit 1; \
	fi

# Memory: 1,000 Fashion-MNIST training images per class; queries: 100 held-out test images per class.
demo: install
	$(VMEM) prepare-data fashion-mnist --out $(DATA)/fashion-mnist --per-class 1000 --test-per-class 100
	$(VMEM) build --images $(DATA)/fashion-mnist/train --output $(OUT)/fmnist-memory --shards 4 --overwrite
	$(VMEM) info $(OUT)/fmnist-memory
	$(VMEM) evaluate --memory $(OUT)/fmnist-memory --images $(DATA)/fashion-mnist/test \
	    --output $(OUT)/fmnist-eval --k-max 100 --pixel-baseline 10

# Serve the demo memory (`make demo` builds it): http://127.0.0.1:8080/. Apply and undo need a write token:
# make serve WRITE_TOKEN_FILE=token.txt (a file holding at least 16 random characters).
WRITE_TOKEN_FILE ?=
serve: install
	@test -f $(OUT)/fmnist-memory/manifest.json || { echo "no demo memory in $(OUT)/fmnist-memory: run 'make demo' first" >&2; exit 1; }
	$(VMEM) serve --memory $(OUT)/fmnist-memory $(if $(WRITE_TOKEN_FILE),--write-token-file $(WRITE_TOKEN_FILE))

# Every experiment of docs/paper.md on both datasets: reports in $(OUT)/paper, embeddings cached in
# $(OUT)/paper-work. PAPER_DOCS=docs/paper also copies the plots and reports there (how docs/paper was made).
PAPER_DOCS ?=
paper: install
	$(PY) -m evaluation.experiments.paper --output $(OUT)/paper --work-dir $(OUT)/paper-work \
	    $(if $(PAPER_DOCS),--docs $(PAPER_DOCS))

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# Build, add, forget, prune, evaluate and re-index with SDK workers in a separate virtualenv that holds only the
# sdist Beam stages from --setup_file (tests/pipelines/test_portable.py; about 3 minutes on 2 cores).
test-portable: install
	$(PY) -m pytest -q -m slow tests/pipelines/test_portable.py

bench: install
	$(PY) -m evaluation.benchmarks.bench_voting
	$(PY) -m evaluation.benchmarks.bench_search
	$(PY) -m evaluation.benchmarks.bench_jobs

clean:
	rm -rf $(OUT) $(DATA) .pytest_cache
