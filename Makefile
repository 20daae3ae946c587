# mmel — `make help` lists the targets. Everything runs in a virtualenv ($(VENV)), created on first use.
# Override the interpreter or the venv:  make test PYTHON=python3.11 VENV=/tmp/venv
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mmel-installed
# Every dependency is installed from the hashed lock requirements/lock.txt (made by `make lock` from pyproject.toml's
# dependencies and all its extras, with torch/torchvision pinned by requirements/pins.txt to the pair our machines
# carry on disk). The lock is resolved for CPython 3.11 on linux x86_64 (our machines and CI); on another platform
# install unlocked: pip install -e '.[dev,sweep,app]'.
LOCK    = requirements/lock.txt
PINS    = requirements/pins.txt
PIP_VERSION = 26.3
# pip-tools runs in a venv of its own (it is not a dependency of mmel)
LOCK_VENV ?= .venv-lock
PIP_TOOLS = pip-tools==7.6.2
LOCK_ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lock test test-all lint format demo shapes bench gpu-check clean app wheel-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# --require-hashes: every package must be in the lock with a matching sha256 (an incomplete lock fails here).
# mmel itself: --no-deps (the lock has them) and --no-build-isolation (built with the locked setuptools, so the
# build backend is not an unpinned download either).
# requirements/test-nodeps.txt: test-only references (the LeGrad authors' package) that pin an old open_clip, installed
# hashed and without their dependencies (the file says why).
$(STAMP): pyproject.toml $(LOCK) requirements/test-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements/test-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## create the venv and install the locked dependencies (all extras), then mmel (editable)

lock: ## re-resolve requirements/lock.txt (all extras, hashes); keeps current pins unless LOCK_ARGS=--upgrade
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q $(PIP_TOOLS))
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --all-extras --generate-hashes \
		--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		--constraint $(PINS) --output-file $(LOCK) $(LOCK_ARGS) pyproject.toml

test: install ## run the test suite (fast tests; markers slow/gpu/data are skipped)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install ## run every test including the slow ones
	$(BIN)/python -m pytest -m "not gpu and not data" $(PYTEST_ARGS)

lint: install ## ruff lint + format check + the import-layer contract (docs/architecture.md)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The wheel as a user gets it: built here, installed into a fresh venv from the lock, run from an empty folder
# (.ci/wheel-check says what it asserts). CI runs it after test and lint.
wheel-check: install ## build the wheel, install it in a clean venv, run mmel-explain / mmel-evaluate in an empty dir
	PYTHON=$(PYTHON) BUILD_PYTHON=$(BIN)/python PIP_VERSION=$(PIP_VERSION) .ci/wheel-check

format: install ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install ## every paper table on the embedded default (shapes world + tiny CLIP) -> results/shapes/report.html
	$(BIN)/python -m experiments.paper shapes

.PHONY: relations
relations: install ## the relational world's tables (relational accuracy, HSRM parts over seeds) -> results/relations/
	$(BIN)/python -m experiments.paper relations

app: install ## the explorer: compare explanations in the browser at http://127.0.0.1:7860 (ARGS="--port 8000 ...")
	$(BIN)/python -m mmel.app $(ARGS)

shapes: install ## write the synthetic shapes world (COCO + Flickr30k Entities formats) under data/shapes
	$(BIN)/python -m mmel.data.shapes --root data/shapes --seed 0

.PHONY: pretrain
pretrain: install ## train the tiny CLIP on the shapes world -> src/mmel/pretrain/assets/ (the committed file; ~30 min)
	$(BIN)/python -m mmel.pretrain --out src/mmel/pretrain/assets/mmel-tiny-shapes.safetensors --seed 0

.PHONY: pretrain-relations
pretrain-relations: install ## retrain the tiny CLIP on the relational world (from the plain weights; ~25 min)
	$(BIN)/python -m mmel.pretrain --world relations --out src/mmel/pretrain/assets/mmel-tiny-shapes-relations.safetensors --seed 0 --steps 1500 --val-every 500 --init shapes --pair-weight 3.0 --counterfactual 0.9 --relational 0.9

bench: install ## speed / memory benchmarks (ratios measured side by side; bench_gpu.py at --size small on the CPU)
	@rc=0; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || rc=1; done; exit $$rc

# the bench scripts above that are about a GPU skip nothing on the CPU; this one is the GPU check of the real run
gpu-check: install ## one-GPU speed check of the real run (ViT-B/16, <= 8 min): evaluate vs floor, cache, bf16 -> logs/bench_gpu.json
	$(BIN)/python benchmarks/bench_gpu.py --device cuda --size full --out logs/bench_gpu.json

clean: ## remove caches and run outputs (keeps the venv and generated data)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
