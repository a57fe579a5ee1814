# The two commands of the README:
#   make serve   set up everything, export the model (once) and serve it
#   make test    set up everything and run the checks and the test suite (what CI runs: .ci/run)
# and, with no model download: make demo (a small random-weight ModernBERT, every API on it).

PYTHON ?= python3
VENV ?= .venv
MODEL ?= Alibaba-NLP/gte-reranker-modernbert-base
REPOSITORY ?= artifacts/model_repository
NAME ?= reranker
PORT ?= 50051
HTTP_PORT ?= 8080
EXPORT_ARGS ?=
SERVE_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve export demo test test-fast check pytest bench bench-quick gpu-pack gpu-check protos clean

install: $(STAMP)

# Re-install when a dependency list changes. torch is pinned (constraints) to the CPU build.
$(STAMP): pyproject.toml client/pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ./client -e '.[triton,export,tracing,dev,bench]'
	touch $@

$(REPOSITORY)/$(NAME)/config.pbtxt: | $(STAMP)
	@$(BIN)/python -m rerank_server.first_contact check-model $(MODEL)
	$(BIN)/rerank export --model $(MODEL) --output $(REPOSITORY) --name $(NAME) $(EXPORT_ARGS)

export: $(REPOSITORY)/$(NAME)/config.pbtxt

serve: install export
	$(BIN)/rerank serve --model-repository $(REPOSITORY) --model-name $(NAME) --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

# A small random-weight ModernBERT with the real tokenizer, named as such in every answer: gRPC, HTTP, SDK
# and CLI with no download (its scores mean nothing).
DEMO_DIR ?= artifacts/demo
DEMO_MODEL_ID := random-modernbert-demo (random weights, not a real reranker)

$(DEMO_DIR)/checkpoint/config.json: | $(STAMP)
	$(BIN)/python -m rerank_server.first_contact demo-checkpoint $(DEMO_DIR)/checkpoint

$(DEMO_DIR)/repository/$(NAME)/config.pbtxt: $(DEMO_DIR)/checkpoint/config.json
	$(BIN)/rerank export --model $(DEMO_DIR)/checkpoint --model-id "$(DEMO_MODEL_ID)" --precision fp32 --output $(DEMO_DIR)/repository --name $(NAME) --overwrite

demo: install $(DEMO_DIR)/repository/$(NAME)/config.pbtxt
	$(BIN)/rerank serve --model-repository $(DEMO_DIR)/repository --model-name $(NAME) --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

test: check pytest

# The fast tier (no exported model, no Triton; tests/conftest.py marks the rest e2e): about a minute.
test-fast: install
	$(BIN)/python -m pytest -m "not e2e"

# The throughput benchmark (docs/performance.md): every CPU precision in-process and served (fp32 and
# --precision auto); full size takes 10-30 minutes on 2 cores. Without --workdir it works in a temporary folder.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# The GPU check (docs/performance.md, GPU): `make gpu-pack` here writes what travels (Triton's subset, the
# project, wheels; < 64 MiB); on the GPU machine, from the repository root and with no venv or network,
# `make gpu-check` unpacks it and runs `python -m bench.gpu` (about 7 minutes).
GPU_PACK ?= artifacts/gpu-pack
GPU_ARGS ?= --output bench/results-gpu
GPU_PACK_ARGS ?=
GPU_RUN_ARGS ?=
gpu-pack: install
	$(BIN)/python -m bench.gpu_pack pack --output $(GPU_PACK) $(GPU_PACK_ARGS)

gpu-check:
	$(PYTHON) -m bench.gpu_pack run $(GPU_PACK) $(GPU_RUN_ARGS) -- $(GPU_ARGS)

protos: install
	$(BIN)/python tools/generate_protos.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
