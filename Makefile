# The two commands of the quick start, and the few others people and CI share.
# Each target creates .venv and installs what it needs from nothing (Python 3.11 + pip).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of inputs: changing pyproject.toml or constraints.txt reinstalls.
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/digits

.PHONY: run test test-gpu bench-gpu system-tools lint format bench why-bn clean image-test

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,serve,cpu,dev,deploy]'
	touch $(STAMP)

## run: the main job: train, fold, export and verify the digits model unless models/ has it
run: $(STAMP)
	$(BIN)/foldserve run --repository models --name digits --out $(RUN_DIR)

## test: the whole test suite (what CI runs)
test: $(STAMP) system-tools
	$(BIN)/python -m pytest

# Debian packages some tests drive: Chromium for the model pages, docker-compose to validate
# the compose files. Installed when this runs as
# root with apt (a fresh CI machine); elsewhere those tests skip and say why.
SYSTEM_PACKAGES := chromium docker-compose
system-tools:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing (Debian packages for the tests)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "not installed:$$missing; the tests that need them will skip"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/train_digits.py

why-bn: $(STAMP)
	$(BIN)/foldserve why-bn --out runs/why_bn

# On a machine with an NVIDIA GPU: its own environment, with onnxruntime-gpu (and its CUDA and
# cuDNN wheels) in place of onnxruntime, which shares its import name (never install both).
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
$(GPU_STAMP): pyproject.toml constraints.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[train,serve,dev]'
	$(GPU_VENV)/bin/python -m pip uninstall --quiet -y onnxruntime
	$(GPU_VENV)/bin/python -m pip install --quiet -c constraints.txt 'onnxruntime-gpu[cuda,cudnn]'
	touch $(GPU_STAMP)

## test-gpu: on a CUDA machine, the GPU-marked tests; every one must run (-rs lists any skip)
test-gpu: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -c 'import onnxruntime as o, torch; print(o.get_available_providers(), torch.cuda.is_available())'
	$(GPU_VENV)/bin/python -m pytest -m gpu -rs

## bench-gpu: on a CUDA machine, bench/gpu.py; figures to bench/gpu-results.json
bench-gpu: $(GPU_STAMP)
	$(GPU_VENV)/bin/python bench/gpu.py --json bench/gpu-results.json

## image-test: build the cpu, gpu and train images with buildah and run them (root; minutes the first time)
image-test: $(STAMP)
	scripts/image-test.sh

clean:
	rm -rf $(VENV) $(GPU_VENV) runs .pytest_cache .ruff_cache .hypothesis
