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

.PHONY: install sdk-deps go-deps prometheus serve export demo test test-fast test-e2e test-e2e-timed test-e2e-untimed test-e2e-after-fast check bench bench-quick gpu-pack gpu-check protos clean

install: $(STAMP)

# Re-install when a dependency list changes. torch is pinned (constraints) to the CPU build.
# uv installs the same pinned set as pip, faster (bytecode compiled by both; 2 Zen 5 cores, warm cache: about
# 31 s). It does not read pip's configuration, so the find-links pip is configured with (where these
# machines keep the CPU build of torch) are passed on; pip does the install if uv fails. Bytecode is compiled
# at install, as pip does: where PYTHONDONTWRITEBYTECODE is set no process writes it later, and every one that
# imports torch and transformers would compile them again (4.6 s of CPU each, dozens of processes in make test).
EXTRAS := triton,export,tracing,dev,bench
FIND_LINKS = $(sort $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null) $(PIP_FIND_LINKS))

$(STAMP): pyproject.toml client/pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c requirements/constraints.txt pip uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(foreach l,$(FIND_LINKS),--find-links $(l)) \
		-c requirements/constraints.txt -e ./client -e '.[$(EXTRAS)]' \
	|| $(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ./client -e '.[$(EXTRAS)]'
	touch $@

# The TypeScript and Go SDKs' tools (their tests in tests/test_sdks.py, the stale checks, make protos): the
# npm package's locked dependencies, and Debian's Go toolchain and gRPC packages (there is no Go module
# proxy here: the tests build in GOPATH mode against /usr/share/gocode). protobuf 1.5 (the APIv2 shim)
# is named because apt would otherwise pick 1.3, which cannot encode the generated messages.
TS_SDK := client/typescript
GO_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev \
	golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# make test installs the dependencies three at a time: apt runs one at a time (a second apt-get update
# would fail on apt's lock).
APT_LOCK := flock /tmp/rerank-make-apt.lock

sdk-deps: $(TS_SDK)/node_modules/.package-lock.json go-deps

$(TS_SDK)/node_modules/.package-lock.json: $(TS_SDK)/package-lock.json
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || { echo "the TypeScript SDK needs Node.js 20 or later (node, npm)"; exit 1; }
	cd $(TS_SDK) && npm ci --no-audit --no-fund
	touch $@

go-deps:
	@test "$$(dpkg-query -W -f='$${db:Status-Abbrev}\n' $(GO_DEBS) 2>/dev/null | grep -c '^ii')" = "$(words $(GO_DEBS))" \
		|| $(APT_LOCK) sh -c '$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(GO_DEBS)'

# Debian's Prometheus server and promtool, unpacked into the venv (nothing installed system-wide, no service
# started): tests/test_monitoring.py runs the alerts, the dashboard and the autoscaler's queries on them.
PROMETHEUS := $(VENV)/prometheus/usr/bin/prometheus

prometheus: $(PROMETHEUS)

$(PROMETHEUS): | $(STAMP)
	rm -rf $(VENV)/prometheus $(VENV)/prometheus-deb && mkdir -p $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && $(APT_LOCK) sh -c 'apt-get download prometheus || ($(SUDO) apt-get update -qq && apt-get download prometheus)'
	dpkg -x $(VENV)/prometheus-deb/prometheus_*.deb $(VENV)/prometheus
	rm -rf $(VENV)/prometheus-deb
	test -x $@ && touch $@

# An exported model holds a copy of the model package and the config the exporter wrote: it is made again
# when either changes, so that what Triton serves is what this checkout exports.
EXPORTER := $(shell find server/rerank_server/export server/rerank_triton_model \( -name '*.py' -o -name '*.template' \) 2>/dev/null)

$(REPOSITORY)/$(NAME)/config.pbtxt: $(EXPORTER) | $(STAMP)
	@$(BIN)/python -m rerank_server.first_contact check-model $(MODEL)
	$(BIN)/rerank export --model $(MODEL) --output $(REPOSITORY) --name $(NAME) --overwrite $(EXPORT_ARGS)

export: $(REPOSITORY)/$(NAME)/config.pbtxt

serve: install export
	$(BIN)/rerank serve --model-repository $(REPOSITORY) --model-name $(NAME) --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

# A small random-weight ModernBERT with the real tokenizer, named as such in every answer: gRPC, HTTP, SDK
# and CLI with no download (its scores mean nothing).
DEMO_DIR ?= artifacts/demo
DEMO_MODEL_ID := random-modernbert-demo (random weights, not a real reranker)

$(DEMO_DIR)/checkpoint/config.json: | $(STAMP)
	$(BIN)/python -m rerank_server.first_contact demo-checkpoint $(DEMO_DIR)/checkpoint

$(DEMO_DIR)/repository/$(NAME)/config.pbtxt: $(DEMO_DIR)/checkpoint/config.json $(EXPORTER)
	$(BIN)/rerank export --model $(DEMO_DIR)/checkpoint --model-id "$(DEMO_MODEL_ID)" --precision fp32 --output $(DEMO_DIR)/repository --name $(NAME) --overwrite

demo: install $(DEMO_DIR)/repository/$(NAME)/config.pbtxt
	$(BIN)/rerank serve --model-repository $(DEMO_DIR)/repository --model-name $(NAME) --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two tiers, each test run once: the fast tier (no exported model, no Triton: about a minute), then the
# end-to-end tier (modules and tests marked e2e; tests/conftest.py refuses a fast test that needs Triton),
# as two processes at once: the modules that time real servers (deadlines, restarts, overload, drains, slow
# clients) in one; in the other those that time nothing (the benchmark commands, exports, the precision
# choice, warm-up, long-pair routing, model control, the make targets), none of which uses the first's shared
# stack. Each test runs in exactly one process (tests/test_tiers.py). test_export.py goes first: it exports the
# session's models while the fast tier runs, and the timed process, which starts later, finds them ready.
E2E_UNTIMED := tests/test_export.py tests/test_bench.py tests/test_precision.py tests/test_models.py \
	tests/test_http_first_contact.py tests/test_make_serve.py tests/test_warmup.py tests/test_quantize.py tests/test_long_routing.py \
	tests/test_generality.py
E2E_TIMED_RUN = $(BIN)/python -m pytest -m e2e $(addprefix --ignore=,$(E2E_UNTIMED))
E2E_UNTIMED_RUN = $(BIN)/python -m pytest -p no:cacheprovider -m e2e $(E2E_UNTIMED)

# The end-to-end processes of one run export the session's models once, in a folder of the run's own
# (tests/conftest.py, built_once), removed when the run ends.
SHARED = export RERANK_TEST_SHARE="$$(mktemp -d)" && trap 'rm -rf "$$RERANK_TEST_SHARE"' EXIT &&

# On two cores, nothing waiting on one job alone: the dependencies three at a time (Python packages, the
# SDKs' tools, Prometheus); then, each process printed whole when it ends, the checks, the fast tier and the
# untimed end-to-end process at once, and the timed one once the fast tier passes (it times real servers:
# it runs beside one other process only). A failed check fails the run when the others end.
test:
	$(MAKE) --no-print-directory -j3 --output-sync=target install sdk-deps $(PROMETHEUS)
	$(SHARED) $(MAKE) --no-print-directory -j3 --output-sync=target check test-fast test-e2e-untimed test-e2e-after-fast

test-e2e-after-fast: test-fast
	$(E2E_TIMED_RUN)

test-fast: install sdk-deps $(PROMETHEUS)
	$(BIN)/python -m pytest -m "not e2e"

test-e2e: install sdk-deps $(PROMETHEUS)
	$(SHARED) $(MAKE) --no-print-directory -j2 --output-sync=target test-e2e-timed test-e2e-untimed

test-e2e-timed:
	$(E2E_TIMED_RUN)

test-e2e-untimed:
	$(E2E_UNTIMED_RUN)

# The throughput benchmark (docs/performance.md): every CPU precision in-process and served (fp32 and
# --precision auto); full size takes tens of minutes on 2 cores (docs/performance.md gives each run's time).
# Without --workdir it works in a temporary folder.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# The GPU check (docs/performance.md, GPU): `make gpu-pack` here writes what travels (Triton's subset, the
# project, wheels; < 64 MiB); on the GPU machine, from the repository root and with no venv or network,
# `make gpu-check` unpacks it and runs `python -m bench.gpu` (its time budget: --budget-s 420).
GPU_PACK ?= artifacts/gpu-pack
GPU_ARGS ?= --output bench/results-gpu
GPU_PACK_ARGS ?=
GPU_RUN_ARGS ?=
gpu-pack: install
	$(BIN)/python -m bench.gpu_pack pack --output $(GPU_PACK) $(GPU_PACK_ARGS)

gpu-check:
	$(PYTHON) -m bench.gpu_pack run $(GPU_PACK) $(GPU_RUN_ARGS) -- $(GPU_ARGS)

# Every SDK's generated code from proto/ (proto/buf.gen.yaml: Python, TypeScript, Go).
protos: install sdk-deps
	$(BIN)/python tools/generate_protos.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
