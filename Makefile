# The two commands a fresh machine needs: `make serve` and `make test`. Both prepare .venv, the default model and
# the gRPC stubs first; each step is skipped when its output is up to date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-compiled
MODEL := .models/SmolLM2-135M-Instruct/config.json
STUBS := server/pb/certkv/v1/inference_pb2.py
HOST ?= 127.0.0.1
PORT ?= 50051
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup model proto serve test bench loadtest clean corpus evaluate

setup: $(INSTALLED) $(STUBS) $(KERNELS)

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Compiles the CPU kernels once for this machine (numba's cache lives in ~/.cache/certkv), so that no test pays for it.
$(KERNELS): kernels/cpu.py $(INSTALLED)
	$(BIN)/python -m kernels
	touch $@

$(STUBS): proto/certkv/v1/inference.proto $(INSTALLED)
	$(BIN)/python -m grpc_tools.protoc -Iserver/pb=proto --python_out=. --pyi_out=. --grpc_python_out=. $<

proto: $(STUBS)

$(MODEL): | $(INSTALLED)
	$(BIN)/python -m engine.weights install

model: $(MODEL)

serve: setup $(MODEL)
	$(BIN)/python -m server --host $(HOST) --port $(PORT) $(ARGS)

test: setup $(MODEL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup $(MODEL)
	$(BIN)/python loadtest/bench_throughput.py

loadtest: setup $(MODEL)
	$(BIN)/python loadtest/run_loadtest.py

clean:
	rm -rf $(VENV) server/pb .pytest_cache .hypothesis

# The development corpus (ENV.md): Ruth, Esther and Jonah from Debian's King James Bible, verse numbers stripped.
CORPUS := .data/kjv.txt
$(CORPUS):
	command -v bible >/dev/null || apt-get install -y bible-kjv-text bible-kjv
	mkdir -p .data
	for r in "Ru1:1-4:22" "Es1:1-10:3" "Jon1:1-4:11"; do bible -l100000 "$$r"; done \
		| sed -E 's/^ +[0-9]+ //; /^[A-Za-z]+ [0-9]+$$/d; /^$$/d' > $@

corpus: $(CORPUS)

evaluate: setup $(MODEL) $(CORPUS)
	$(BIN)/python loadtest/bench_quality.py
