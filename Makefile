# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install vlmkit, run the main job on an embedded default
#   make test   create .venv, install vlmkit with its test extras, run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test

VLLM_VENV := .venv-vllm
VLLM_INSTALLED := $(VLLM_VENV)/.installed
LLAMA_SERVER := $(VENV)/bin/llama-server

.PHONY: demo test test-fast install clean vllm llama-server engines

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(INSTALLED): pyproject.toml scripts/install-torch.sh | $(PY)
	bash scripts/install-torch.sh $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# The test extras add llama.cpp, DeepSpeed, a browser driver, and the data tools. llama-cpp-python comes
# from the one llama.cpp build below (pip finds it installed and builds no second copy).
$(TEST_INSTALLED): $(INSTALLED) $(LLAMA_SERVER)
	# DeepSpeed's build imports torch: build it against the torch just installed, not an isolated download
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.14"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(INSTALLED)

# The serving engines of `vlmkit serve --engine` (the slow engine tests need both)
$(VLLM_INSTALLED): scripts/install-vllm.sh scripts/install-torch.sh
	PYTHON=$(PYTHON) bash scripts/install-vllm.sh $(VLLM_VENV)
	touch $@

vllm: $(VLLM_INSTALLED)

# llama.cpp compiled once (minutes; cached in ~/.cache/vlmkit): llama-cpp-python's wheel carries its
# libraries, and llama-server and ggml-rpc-server go beside $(PY)
$(LLAMA_SERVER): pyproject.toml scripts/build-llama-cpp.sh scripts/llama-cpp-source.sh scripts/llama-cpp-wheel.cmake | $(INSTALLED)
	bash scripts/build-llama-cpp.sh $(PY)

llama-server: $(LLAMA_SERVER)

engines: vllm llama-server

demo: $(INSTALLED)
	$(PY) -m vlmkit.demo

test: $(TEST_INSTALLED) engines
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(TEST_INSTALLED)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output .pytest_cache
