# make demo  — the end-to-end demo on the built-in corpus (writes runs/demo/report.html)
# make quick — the same with tiny models in a few minutes (writes runs/demo-quick/report.html)
# make test  — the test suite
# Each creates .venv when missing and installs the CPU torch pin plus lmalloy and its test deps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test quick lint install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmalloy demo $(DEMO_ARGS)

quick: $(STAMP)
	$(BIN)/lmalloy demo --quick

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
