# `make demo` and `make test` each do all set-up on a fresh machine, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo screenshot search results results-cpu test test-extended test-all test-fast bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev,dashboard]"
	touch $@

# Fashion-MNIST without internet: the Debian/Ubuntu package. Skipped when RAYROBUST_DATA is set.
data:
	@if [ -n "$$RAYROBUST_DATA" ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST not found: install dataset-fashion-mnist, set RAYROBUST_DATA, or add 'data: {download: true}'"; \
	fi

demo: setup
	$(VENV)/bin/rayrobust pipeline --config configs/demo.yaml
	$(VENV)/bin/rayrobust report runs/demo

# The README's picture of the demo's report (headless Chromium, as in the browser test): run `make demo` first.
screenshot: browser
	@test -f runs/demo/report.html || { echo "runs/demo/report.html not found: run make demo first"; exit 1; }
	/usr/bin/chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,2200 \
		--screenshot=docs/report.png file://$(CURDIR)/runs/demo/report.html

# One search of the three knobs (cluster count, repulsion margin, eps) across clustr, drp_at and pgd_at, with its
# report: under 30 minutes on 2 cores (README, "A search of the three knobs").
search: setup
	$(VENV)/bin/rayrobust tune --config configs/search.yaml
	$(VENV)/bin/rayrobust report runs/search

# The full comparison (all methods, 2 seeds, AutoAttack on 1000 images): sized for GPUs, see README.
results: setup
	$(VENV)/bin/rayrobust results --config configs/results.yaml

# The same comparison reduced for a CPU-only machine (about 2 hours on 2 cores).
results-cpu: setup
	$(VENV)/bin/rayrobust results --config configs/results_cpu.yaml

# Headless Chromium for the report's browser test (Debian packages; skipped when present).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium not found: install chromium and chromium-driver (tests/test_report_browser.py needs them)"; \
	fi

# The default run (under 30 minutes on 2 cores): every unit test and the Ray, S3 and 2-node cluster tests.
test: setup browser
	$(PY) -m pytest -q -m "not extended" --durations=25

# The extended tier: single-node fault variants, the seeded Tune search, 2-seed results, per-defense Ray Train runs.
test-extended: setup browser
	$(PY) -m pytest -q -m extended --durations=15

test-all: setup browser
	$(PY) -m pytest -q --durations=25

test-fast: setup browser
	$(PY) -m pytest -q -m "not ray and not slow"

bench: setup
	$(PY) bench/train_step.py

clean:
	rm -rf runs .pytest_cache
