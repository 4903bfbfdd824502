# Two commands: `make serve` (service on the bundled models) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 0.0.0.0
PORT ?= 8000
# onnxruntime build for the service: cpu (default) or gpu (onnxruntime-gpu, CUDA/TensorRT hosts)
ORT ?= cpu
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: serve install install-test lock system-deps test lint format train docs bench screenshots clean

# Installs come from the lock (uv.lock, exported to requirements/*.txt with hashes by `make lock`
# from the ranges in pyproject.toml), so a fresh clone gets what was tested. A stamp per lock keeps an
# unchanged tree from re-running pip at every `make serve`.
PIP_VERSION := 25.3
SERVE_LOCK := requirements/serve$(if $(filter gpu,$(ORT)),-gpu).txt
TEST_LOCK := requirements/test.txt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet pip==$(PIP_VERSION)

# The service install: torch-free.
$(VENV)/.installed-serve-$(ORT): $(SERVE_LOCK) pyproject.toml | $(BIN)/python
	$(PIP) install --quiet --require-hashes -r $(SERVE_LOCK)
	$(PIP) install --quiet --no-deps -e .
	touch $@
install: $(VENV)/.installed-serve-$(ORT)

# Blocks in the foreground; Ctrl-C stops it. Binds $(HOST):$(PORT) (all interfaces by default).
serve: install
	$(BIN)/uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

# Tests also train tiny models of every family, so they need the training extra (torch 2.14.1
# and torchvision 0.29.1 come from this machine's disk).
$(VENV)/.installed-test: $(TEST_LOCK) pyproject.toml | $(BIN)/python
	$(PIP) install --quiet --require-hashes -r $(TEST_LOCK)
	$(PIP) install --quiet --no-deps -e .
	touch $@
install-test: $(VENV)/.installed-test

# The lock is uv.lock (every package of every extra, exact versions and hashes, for x86-64 and
# ARM); requirements/*.txt are its exports that pip installs. `make lock` re-resolves what
# pyproject.toml's ranges changed (`make lock UPGRADE=--upgrade`: everything to the newest
# allowed) and exports again; then `make test` and commit uv.lock with the exports.
EXPORT := $(BIN)/uv export --frozen --no-emit-project --format requirements-txt --quiet
lock: $(BIN)/python
	$(PIP) install --quiet uv==0.13.10
	$(BIN)/uv lock --python 3.11 $(UPGRADE)
	$(EXPORT) --extra cpu --extra train --extra test -o $(TEST_LOCK)
	$(EXPORT) --extra cpu -o requirements/serve.txt
	$(EXPORT) --extra gpu -o requirements/serve-gpu.txt

# Debian packages the tests run for real: prometheus (promtool and a server for the scrape test),
# orthanc and orthanc-dicomweb (a PACS for the DICOMweb tests), dcmtk (storescu for C-STORE),
# chromium and chromium-driver (a real browser for the report and viewer tests), dicom3tools
# (dciodvfy checks the DICOM objects we write). Tests skip with
# a reason where they cannot be installed (not root, no apt).
DEBIAN_PACKAGES := prometheus orthanc orthanc-dicomweb dcmtk chromium chromium-driver postgresql \
	dicom3tools
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEBIAN_PACKAGES)
system-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1 \
	  && command -v chromedriver >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 \
	  && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  $(APT_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) >/dev/null 2>&1; } \
	  || echo "could not install $(DEBIAN_PACKAGES): their tests will skip"; \
	else echo "not root or no apt: $(DEBIAN_PACKAGES) not installed, their tests will skip"; fi

lint: install-test
	$(BIN)/ruff check app training research tools tests bench
	$(BIN)/ruff format --check app training research tools tests bench

test: lint system-deps
	$(BIN)/python -m pytest -q

format: install-test
	$(BIN)/ruff check --fix app training research tools tests bench
	$(BIN)/ruff format app training research tools tests bench

# Retrain every shipped model from its recipe and promote it into models/ (CPU: many hours;
# see README). Each run writes runs/<name>/export first (with test figures: the shipped model is
# the one run that measures test); promote validates and copies; the served cards' calibration,
# fused score and operating points are then fitted on val through the served pipeline.
# family:recipe (training/configs/<recipe>.yaml):model name
TRAIN_RUNS := cropper:cropper:cropper-unet simclr:simclr:classifier-simclr-resnet18 \
	ensemble:mobilenet-ensemble:classifier-mobilenetv2-ensemble bam:bam:classifier-bam-mobilenetv2 \
	yolo:yolo:detector-yolov8n frcnn:frcnn-mobilenet:detector-frcnn-mobilenetv2 \
	frcnn:frcnn-mobilenet-robust:detector-frcnn-mobilenetv2-robust dino:dino:classifier-dino-vits14
train: install-test
	@set -e; for run in $(TRAIN_RUNS); do family=$${run%%:*}; rest=$${run#*:}; \
	  recipe=$${rest%%:*}; name=$${rest#*:}; \
	  $(BIN)/python -m training $$family --config training/configs/$$recipe.yaml --report-test; \
	  $(BIN)/python -m training promote runs/$$name/export; done
	$(BIN)/python -m training calibrate --split val --write-card

# README pictures, taken by the browser tests (a real chromium on the real pages).
screenshots: install-test system-deps
	$(BIN)/python -m pytest -q tests/app/api/test_viewer.py tests/training/test_report.py
	mkdir -p docs && cp reports/viewer.png reports/report.png docs/

# The README's numbers (models table from the cards, the sample answer from the service).
docs: install-test
	$(BIN)/python -m training readme

bench: install
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
