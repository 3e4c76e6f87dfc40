# The two commands a fresh machine needs: `make serve` and `make test`. Both prepare .venv, the default model and
# the gRPC stubs first; each step is skipped when its output is up to date. `make` alone lists the targets.
#
# A target's help is the `## ` comment on its rule line: `make help` lists exactly those, in file order.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-compiled
# Models, GGUF conversions and compiled CPU kernels live in the user's cache, as for a pip-installed certkv.
CERTKV_HOME ?= $(HOME)/.cache/certkv
CERTKV_MODELS_DIR ?= $(CERTKV_HOME)/models
export CERTKV_HOME CERTKV_MODELS_DIR
MODEL := $(CERTKV_MODELS_DIR)/SmolLM2-135M-Instruct/config.json
STUBS := server/pb/certkv/v1/inference_pb2.py
HOST ?= 127.0.0.1
PORT ?= 50051
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup model proto serve test test-fast bench loadtest evaluate evaluate-long gpu-check corpus clean

help: ## list the targets (this text)
	@echo "usage: make TARGET [ARGS='server flags'] [PYTEST_ARGS='pytest flags']"
	@awk -F ':.*## ' '/^[a-zA-Z0-9_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(INSTALLED) $(STUBS) $(KERNELS) ## create .venv (torch 2.13.0 pinned by constraints.txt), the stubs, the CPU kernels

$(INSTALLED): pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Compiles the CPU kernels once for this machine (numba's cache lives in $(CERTKV_HOME)), so that no test pays for it.
$(KERNELS): kernels/cpu.py $(INSTALLED)
	$(BIN)/python -m kernels
	touch $@

$(STUBS): proto/certkv/v1/inference.proto $(INSTALLED)
	$(BIN)/python -m grpc_tools.protoc -Iserver/pb=proto --python_out=. --pyi_out=. --grpc_python_out=. $<

proto: $(STUBS) ## generate the gRPC stubs in server/pb from proto/

$(MODEL): | $(INSTALLED)
	$(BIN)/python -m engine.weights install

model: $(MODEL) ## install the default model (SmolLM2-135M-Instruct) into $CERTKV_HOME/models

serve: setup $(MODEL) ## serve the default model on HOST:PORT (127.0.0.1:50051); ARGS="--kv-mode dense" adds flags
	$(BIN)/python -m server --host $(HOST) --port $(PORT) $(ARGS)

test: setup $(MODEL) ## the whole test suite, slow default-model and packaging tests included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup $(MODEL) ## the suite without the tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup $(MODEL) ## throughput benchmark (loadtest/bench_throughput.py)
	$(BIN)/python loadtest/bench_throughput.py

loadtest: setup $(MODEL) ## locust load test against a local server (loadtest/run_loadtest.py)
	$(BIN)/python loadtest/run_loadtest.py

# The development corpus: Ruth, Esther and Jonah from Debian's King James Bible, verse numbers stripped.
CORPUS := .data/kjv.txt
$(CORPUS):
	command -v bible >/dev/null || apt-get install -y bible-kjv-text bible-kjv
	mkdir -p .data
	for r in "Ru1:1-4:22" "Es1:1-10:3" "Jon1:1-4:11"; do bible -l100000 "$$r"; done \
		| sed -E 's/^ +[0-9]+ //; /^[A-Za-z]+ [0-9]+$$/d; /^$$/d' > $@

corpus: $(CORPUS) ## the development corpus (.data/kjv.txt, from Debian's bible-kjv)

evaluate: setup $(MODEL) $(CORPUS) ## quality of each KV mode against dense on the corpus (loadtest/bench_quality.py)
	$(BIN)/python loadtest/bench_quality.py

evaluate-long: setup $(MODEL) $(CORPUS) ## retrieval, perplexity, escalations and memory from 1K to 8K tokens (loadtest/bench_long.py)
	$(BIN)/python loadtest/bench_long.py --json loadtest/results/long.json --plot docs/long-context.png

DIR ?= loadtest/results/gpu-check
gpu-check: setup $(MODEL) ## on a GPU: every kernel test and GPU benchmark in one run, JSON and logs in DIR
	$(BIN)/python loadtest/gpu_check.py $(DIR)

clean: ## remove .venv, the stubs and test caches (models stay in $CERTKV_HOME)
	rm -rf $(VENV) server/pb .pytest_cache .hypothesis
