# The two commands of the quick start, and the few others people and CI share.
# Each target creates .venv and installs what it needs from nothing (Python 3.11 + pip).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of inputs: changing pyproject.toml or constraints.txt reinstalls.
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/digits

.PHONY: run test lint format bench why-bn clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,serve,cpu,dev]'
	touch $(STAMP)

## run: the main job: train, fold, export and verify the digits model unless models/ has it
run: $(STAMP)
	$(BIN)/foldserve run --repository models --name digits --out $(RUN_DIR)

## test: the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
