# Product in Action: every target does its own set-up, so `make run` and `make test`
# work on a fresh machine.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/productinaction/v1/*.proto)
PROTO_OUT := productinaction/v1/.generated
EMBEDDED := .cache/embedded/.ready
# pip's find-links (this machine's CPU torch wheel lies there), handed to uv.
UV_LINKS := $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))

export PYTHONUNBUFFERED := 1
# Python writes .pyc for what it imports (into __pycache__, ignored by git): the install does not byte-compile
# the venv (most of it is never imported), and without .pyc every process would compile torch from source
# again (a machine that sets PYTHONDONTWRITEBYTECODE made the suite 55% slower).
unexport PYTHONDONTWRITEBYTECODE
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help venv protos test test-fast run bench lint fmt clean embedded browser

help:
	@echo "make run    start generator (:50051), upscaler (:50052) and web UI (:7860)"
	@echo "make test   set up, then run the whole test suite"
	@echo "make bench  run the benchmarks, JSON results in bench-results/"
	@echo "make lint   ruff and mypy"

$(STAMP): $(wildcard requirements/*.txt)
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	# uv installs the same requirements about five times faster than pip (parallel downloads, one resolve,
	# no byte-compiling); pip does it when uv cannot be had. torch pinned (requirements/torch.txt): anything
	# looser pulls a multi-GB CUDA build. uv does not read pip's config, so pip's local wheels are passed on.
	# open-clip-torch only for its CLIP BPE vocabulary file; never imported (it needs torchvision).
	if $(BIN)/pip install -q --no-compile uv; then \
		$(BIN)/uv pip install -q --python $(PYTHON) $(UV_LINKS) -r requirements/torch.txt -r requirements/dev.txt \
		&& $(BIN)/uv pip install -q --python $(PYTHON) --no-deps open-clip-torch; \
	else \
		$(BIN)/pip install -q --no-compile -r requirements/torch.txt -r requirements/dev.txt \
		&& $(BIN)/pip install -q --no-compile --no-deps open-clip-torch; \
	fi
	touch $@

venv: $(STAMP)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	mkdir -p productinaction/v1
	$(PYTHON) -m grpc_tools.protoc -Iprotos \
		--python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
	touch productinaction/__init__.py productinaction/v1/__init__.py $@

protos: $(PROTO_OUT)

# A tiny random pipeline and product adapter, for when no trained demo model ships.
$(EMBEDDED): $(STAMP) demo/embedded.py demo/tiny.py demo/tiny_sr.py
	$(PYTHON) -m demo.embedded --out .cache/embedded

embedded: $(EMBEDDED)

browser:
	@command -v chromium >/dev/null || { \
		echo "installing Debian chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed; browser tests will fail"; }

# Two workers (pytest-xdist) for the two cores; a module's tests stay on one worker, so module fixtures
# (the compiled pipeline, the demo generator, the browser stack) are built once. (Three workers were no
# faster on two cores, and the compile and demo modules slowed each other most.)
# The type check runs beside the suite (one core for ~20 s while the workers start their servers); either
# failing fails the target.
test: protos browser
	$(BIN)/ruff check .
	$(BIN)/mypy services client testkit training demo tools > .mypy.log 2>&1 & mypy=$$!; \
	$(PYTHON) -m pytest -q -ra -n 2 --dist loadfile --durations=15; tests=$$?; \
	wait $$mypy; typed=$$?; cat .mypy.log; exit $$(( tests || typed ))

test-fast: protos
	$(PYTHON) -m pytest -q -ra -m "not slow and not browser"

# The random embedded pipeline only when the trained demo models do not ship (tools/run_stack.py picks the same way).
SHIPPED := $(and $(wildcard models/demo-sd/model_index.json),$(wildcard products/*/manifest.yaml),$(wildcard models/demo-swin2sr/config.json))
run: protos $(if $(SHIPPED),,embedded)
	$(PYTHON) -m tools.run_stack

bench: protos embedded
	mkdir -p bench-results
	$(PYTHON) -m benchmarks.run --out bench-results

lint: protos
	$(BIN)/ruff check .
	$(BIN)/mypy services client testkit training demo tools

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf productinaction .cache outputs artifacts bench-results .pytest_cache
