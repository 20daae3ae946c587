# mmel — `make help` lists the targets. Everything runs in a virtualenv ($(VENV)), created on first use.
# Override the interpreter or the venv:  make test PYTHON=python3.11 VENV=/tmp/venv
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mmel-installed
# torch/torchvision are pinned to the pair our machines carry on disk; elsewhere pip downloads them.
TORCH   = torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format demo shapes bench clean app

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,sweep,app]'
	touch $(STAMP)

install: $(STAMP) ## create the venv and install mmel with its dev, sweep and app extras

test: install ## run the test suite (fast tests; markers slow/gpu/data are skipped)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install ## run every test including the slow ones
	$(BIN)/python -m pytest -m "not gpu and not data" $(PYTEST_ARGS)

lint: install ## ruff lint + format check + the import-layer contract (docs/architecture.md)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install ## the main job on the embedded default (shapes world + tiny CLIP); prints the run dir
	$(BIN)/python train.py

app: install ## the explorer: compare explanations in the browser at http://127.0.0.1:7860 (ARGS="--port 8000 ...")
	$(BIN)/python -m mmel.app $(ARGS)

shapes: install ## write the synthetic shapes world (COCO + Flickr30k Entities formats) under data/shapes
	$(BIN)/python -m mmel.data.shapes --root data/shapes --seed 0

.PHONY: pretrain
pretrain: install ## train the tiny CLIP on the shapes world -> src/mmel/pretrain/assets/ (the committed file; ~30 min)
	$(BIN)/python -m mmel.pretrain --out src/mmel/pretrain/assets/mmel-tiny-shapes.safetensors --seed 0

bench: install ## speed / memory benchmarks (ratios measured side by side)
	@rc=0; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || rc=1; done; exit $$rc

clean: ## remove caches and run outputs (keeps the venv and generated data)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
